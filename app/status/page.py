"""``/`` and ``/status``: one server-rendered page, readable without JavaScript, no external resource.

The verdict and each check are the monitor's /health payload of this very request; the per-database
sections, charts, recent runs, targets and retention plan come from the status model (app/status/model.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, render_template, request
from markupsafe import Markup

from app.durations import format_duration, format_size
from app.health import HealthMonitor
from app.manifest import parse_utc, utc_iso
from app.status.model import DEFAULT_WINDOW, PLAN_SHOWN, WINDOWS, StatusCache, units_now

#: Recent runs the page lists (the API has them all).
RUNS_SHOWN = 50


def blueprint(monitor: HealthMonitor, cache_: StatusCache) -> Blueprint:
    bp = Blueprint("page", __name__, template_folder="templates")

    @bp.get("/")
    @bp.get("/status")
    def page() -> Response:
        days_arg = request.args.get("days", str(DEFAULT_WINDOW))
        if days_arg not in {str(d) for d in WINDOWS}:
            text = f"days={days_arg!r} is not one of {', '.join(map(str, WINDOWS))}"
            return Response(text + "\n", 400, {"Content-Type": "text/plain; charset=utf-8"})
        days = int(days_arg)
        payload = monitor.payload()
        model = cache_.get()
        now = datetime.now(UTC)
        units = units_now(payload, model)
        checks = {c["name"]: c for c in payload["checks"]}
        plan = model.plan
        by_db: dict[str, list[dict[str, str]]] = {}
        for d in plan.delete:
            by_db.setdefault(d["database"], []).append(d)
        html = render_template(
            "status.html",
            payload=payload,
            host=payload.get("host"),
            units=units,
            charts={u.name: Markup(u.charts.get(days, "")) for u in model.units},  # noqa: S704 - built escaped
            counts={u.name: u.counts.get(days, {}) for u in model.units},
            days=days,
            windows=WINDOWS,
            runs=model.runs[:RUNS_SHOWN],
            runs_total=len(model.runs),
            targets=model.targets,
            checks=checks,
            plan=plan,
            plan_by_db=by_db,
            plan_shown=PLAN_SHOWN,
            minimal=model.minimal,
            now=utc_iso(now),
            age=lambda iso: _age(iso, now),
            size=lambda n: "-" if n is None else format_size(n),
            seconds=_seconds,
            when=_when,
        )
        return Response(html, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})

    return bp


def _age(iso: str | None, now: datetime) -> str:
    at = parse_utc(iso)
    if at is None:
        return "-"
    delta = (now - at).total_seconds()
    return f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(-delta)}"


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else format_duration(value)


def _when(iso: str | None) -> str:
    """``2026-11-22 03:00 UTC``: the page's one time format."""
    at = parse_utc(iso)
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M UTC")
