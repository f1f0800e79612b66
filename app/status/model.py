"""What the status page and /api/v1 show besides the live verdict, built from the health monitor's cache.

The model is rebuilt on the monitor's change (a target read ended, a job finished), on the thread that made
the change, never per request: a request takes the newest model, and only waits when the model is older than
the cache (a build is then running or about to). Nothing here reads a target or the server.

Every text that leaves here went through ``mask``; with HEALTH_DETAIL=minimal, texts that could name a host,
user, bucket, endpoint or path are withheld, as /health withholds them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from app.catalog import Entry, merge_entries
from app.health import WITHHELD, HealthMonitor, RunEvent, Snapshot, last_drills
from app.logs import mask
from app.manifest import Manifest, parse_utc, utc_iso
from app.retention import Policy, decide
from app.status import chart

log = logging.getLogger(__name__)

#: The chart windows the page offers (days); each is drawn when the model is built.
WINDOWS = (7, 30, 90, 365)
DEFAULT_WINDOW = 30
#: Deletions the page lists per database (the API lists all of them).
PLAN_SHOWN = 20
#: What a skip was, for HEALTH_DETAIL=minimal (the full reason names the host holding the lock or claim).
SKIP_TEXT = {
    "lock": "another instance holds LOCK_FILE",
    "claim": "another host is backing up this slot",
    "slot": "this slot already has a backup",
    "overrun": "the previous backup was still running",
}


@dataclass
class UnitModel:
    """One unit (or retired name): where its newest backup lives, its last drill, its history, its charts."""

    name: str
    kind: str
    expected: bool
    copies: list[str]
    last_drill: dict[str, Any] | None
    points: list[chart.Point]
    drills: list[chart.DrillMark]
    charts: dict[int, str] = field(default_factory=dict)
    #: per window: backups, failed, drills, and the largest size and longest duration (the chart's tops)
    counts: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PlanModel:
    """What `prune --dry-run` would say now: the same decisions (app.retention.decide) from the cache."""

    policy: str
    #: why prune would delete nothing at all (a target could not be read); None when it would run
    blocked: str | None
    delete: list[dict[str, str]]
    keep: int
    #: base backups exist (WAL_ARCHIVE): prune decides them with the WAL chain, which the plan leaves out
    bases: bool = False


@dataclass
class TargetModel:
    name: str
    where: str | None
    backups: int | None
    free_bytes: int | None
    read_at: str | None
    error: str | None


@dataclass
class Model:
    generation: int
    built_at: datetime
    minimal: bool
    units: list[UnitModel]
    #: /api/v1/backups rows, newest first
    backups: list[dict[str, Any]]
    #: /api/v1/runs rows, newest first
    runs: list[dict[str, Any]]
    plan: PlanModel
    targets: list[TargetModel]

    def unit(self, name: str) -> UnitModel | None:
        return next((u for u in self.units if u.name == name), None)


class _Redact:
    """mask() for HEALTH_DETAIL=full; withheld texts for minimal."""

    def __init__(self, minimal: bool) -> None:
        self.minimal = minimal

    def text(self, value: str | None) -> str | None:
        if value is None:
            return None
        return WITHHELD if self.minimal else mask(value)

    def error(self, value: str | None) -> str | None:
        if value is None:
            return None
        return f"failed ({WITHHELD})" if self.minimal else mask(value)


def build(monitor: HealthMonitor, now: datetime | None = None) -> Model:
    """The model of what the monitor's cache holds now."""
    generation = monitor.generation  # read first: a change during the build leaves the model stale, not wrong
    now = now or datetime.now(UTC)
    snap = monitor.snapshot(now)
    events, local = monitor.history()
    settings = monitor.settings
    redact = _Redact(settings.health.detail == "minimal")
    entries = merge_entries([v.entries or [] for v in snap.targets])
    cluster = snap.cluster
    foreign = {e.id for e in entries if cluster is not None and not cluster.matches(e.manifest)}
    mine = [e for e in entries if e.id not in foreign]
    drills = last_drills(snap)
    by_name: dict[str, list[Entry]] = {}
    for e in reversed(mine):  # oldest first
        by_name.setdefault(e.manifest.database, []).append(e)
    units = [_unit(db.name, db.kind, db.expected, db.last_good, by_name.get(db.name, []), drills, redact, now)
             for db in snap.databases + snap.retired]
    return Model(
        generation=generation,
        built_at=now,
        minimal=redact.minimal,
        units=units,
        backups=[backup_doc(e, e.id in foreign, redact) for e in entries],
        runs=_runs(mine, local, events, redact),
        plan=_plan(snap, entries, Policy.from_settings(settings), now, redact),
        targets=[TargetModel(v.target.name, None if redact.minimal else v.target.describe(),
                             None if v.entries is None else len(v.entries), v.free_bytes, utc_iso(v.read_at),
                             None if v.error is None else ("cannot be read" if redact.minimal else mask(v.error)))
                 for v in snap.targets],
    )


def _unit(name: str, kind: str, expected: bool, last_good: Manifest | None, own: list[Entry],
          drills: dict[str, dict[str, Any]], redact: _Redact, now: datetime) -> UnitModel:
    """``own``: the unit's backups of this cluster, oldest first."""
    points = [chart.Point(e.manifest.finished_at or e.manifest.started_at, e.id, e.status, e.manifest.size_bytes,
                          e.manifest.duration_s, redact.error(e.manifest.error)) for e in own]
    marks = []
    for e in own:
        at = _drill_time(e.drill)
        if e.drill is not None and at is not None:
            marks.append(chart.DrillMark(at, e.id, str(e.drill.get("status")), _number(e.drill.get("rto_s")),
                                         redact.error(e.drill.get("error"))))
    marks.sort(key=lambda d: d.at)
    newest = next((e for e in reversed(own) if last_good is not None and e.id == last_good.id), None)
    unit = UnitModel(name, kind, expected, sorted(n for n, ok in newest.copies.items() if ok) if newest else [],
                     drill_doc(drills.get(name), redact), points, marks)
    for days in WINDOWS:
        start = now - timedelta(days=days)
        unit.charts[days] = chart.render(name, points, marks, start, now)
        shown = [p for p in points if start <= p.at <= now]
        top_size, top_duration = chart.scale(points, start, now)
        unit.counts[days] = {"backups": sum(p.state == "ok" for p in shown),
                             "failed": sum(p.state != "ok" for p in shown),
                             "drills": sum(start <= d.at <= now for d in marks),
                             "top_size": top_size, "top_duration": top_duration}
    return unit


def _drill_time(drill: dict[str, Any] | None, key: str = "started_at") -> datetime | None:
    try:
        return parse_utc(str(drill.get(key) or "")) if drill else None
    except ValueError:  # a record written by hand: shown without its time rather than not at all
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def drill_doc(drill: dict[str, Any] | None, redact: _Redact) -> dict[str, Any] | None:
    """A drill record (app/drills.py) as the API shows it."""
    if not drill:
        return None
    return {
        "backup_id": str(drill.get("backup_id") or ""),
        "status": "ok" if drill.get("status") == "ok" else "failed",
        "started_at": utc_iso(_drill_time(drill)),
        "finished_at": utc_iso(_drill_time(drill, "finished_at")),
        "rto_s": _number(drill.get("rto_s")),
        "compared": redact.text(drill.get("compared") or None),
        "error": redact.error(drill.get("error") or None),
    }


def backup_doc(e: Entry, foreign: bool, redact: _Redact) -> dict[str, Any]:
    """One /api/v1/backups row: the manifest's fields `list --json` shows, the state and where copies are."""
    m = e.manifest
    doc: dict[str, Any] = {
        "id": m.id,
        "database": m.database,
        "kind": m.kind,
        "status": m.status,
        "state": e.status,
        "slot": m.slot,
        "started_at": utc_iso(m.started_at),
        "finished_at": utc_iso(m.finished_at),
        "duration_s": m.duration_s,
        "size_bytes": m.size_bytes,
        "raw_bytes": m.raw_bytes,
        "sha256": m.sha256,
        "engine": m.engine_name,
        "format": m.format,
        "compression": m.compression,
        "pg_dump_version": m.pg_dump_version,
        "server_version": m.server_version,
        "stored_on": sorted(name for name, ok in e.copies.items() if ok),
        "foreign": foreign,
        "warnings": [redact.text(w) for w in m.warnings],
        "error": redact.error(m.error),
        "last_drill": drill_doc(e.drill, redact),
    }
    if not redact.minimal:
        doc["host"] = mask(m.host)
    return doc


def _runs(entries: list[Entry], local: list[Manifest], events: list[RunEvent], redact: _Redact) -> list[dict]:
    """Every run the targets record, this process's runs no target took, its skips and job errors; newest first."""
    rows = [_run_doc(e.manifest, e.status, "manifest", redact) for e in entries]
    stored = {e.id for e in entries}
    seen: set[str] = set()
    for m in reversed(local):  # newest first; a run stored since shows as its manifest
        if m.id not in stored and m.id not in seen:
            seen.add(m.id)
            rows.append(_run_doc(m, "ok" if m.ok else "failed", "process", redact))
    for ev in events:
        reason = SKIP_TEXT.get(ev.kind or "", ev.outcome) if redact.minimal and ev.outcome == "skipped" else None
        rows.append({
            "at": utc_iso(ev.at), "database": None, "kind": None, "outcome": ev.outcome, "id": None,
            "started_at": None, "finished_at": None, "duration_s": None, "size_bytes": None,
            "error": redact.error(ev.reason) if ev.outcome == "failed" else None,
            "skip": ev.kind, "reason": (reason or mask(ev.reason)) if ev.outcome == "skipped" else None,
            "slot": ev.slot, "recorded": "process",
        })
    rows.sort(key=lambda r: (r["at"] or "", r["id"] or ""), reverse=True)
    return rows


def _run_doc(m: Manifest, outcome: str, recorded: str, redact: _Redact) -> dict[str, Any]:
    doc = {
        "at": utc_iso(m.finished_at or m.started_at), "database": m.database, "kind": m.kind, "outcome": outcome,
        "id": m.id, "started_at": utc_iso(m.started_at), "finished_at": utc_iso(m.finished_at),
        "duration_s": m.duration_s, "size_bytes": m.size_bytes if m.ok else None, "error": redact.error(m.error),
        "skip": None, "reason": None, "slot": m.slot, "recorded": recorded,
    }
    if not redact.minimal:
        doc["host"] = mask(m.host)
    return doc


def _plan(snap: Snapshot, entries: list[Entry], policy: Policy, now: datetime, redact: _Redact) -> PlanModel:
    """prune's decisions over the cached catalog; prune itself deletes nothing while a target cannot be read."""
    unread = [v for v in snap.targets if v.error is not None or v.entries is None]
    if unread:
        why = "; ".join(f"{v.target.name}: {'not read yet' if v.error is None else redact.error(v.error)}"
                        for v in unread)
        return PlanModel(policy.describe(), f"prune would delete nothing now: a target cannot be read ({why})", [], 0)
    # base backups are weighed with their WAL chain, which prune reads from the targets: not from this cache
    dumps = [e for e in entries if e.manifest.kind != "base"]
    decisions = decide(dumps, policy, now, snap.cluster)
    delete = [{"id": d.backup.id, "database": d.backup.database, "reason": d.reason} for d in decisions if not d.keep]
    return PlanModel(policy.describe(), None, delete, sum(d.keep for d in decisions),
                     any(e.manifest.kind == "base" for e in entries))


class StatusCache:
    """The newest model, rebuilt in the background whenever the monitor's cache changes.

    A request never waits for a build (one takes ~150 ms with a year of daily history for ten databases): it
    gets the newest model there is, at most one build behind the cache, with the live verdict beside it. Only
    the very first request, before any build, builds one itself; a cache that was never started (no background
    thread) builds on demand instead."""

    def __init__(self, monitor: HealthMonitor, builder: Callable[[HealthMonitor], Model] = build) -> None:
        self.monitor = monitor
        self.builder = builder
        self._model: Model | None = None
        self._build_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Build in the background on every change of the monitor (coalesced: one build covers many)."""
        self.monitor.change_listeners.append(self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="status-model", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._build()
            except Exception:  # a bug in the model must not end the builder: the next change tries again
                log.exception("building the status model failed")

    def _build(self) -> Model:
        with self._build_lock:  # a build in flight: wait for it instead of building twice
            model = self._model
            if model is None or model.generation != self.monitor.generation:
                model = self._model = self.builder(self.monitor)
            return model

    def get(self) -> Model:
        model = self._model
        if model is None or (self._thread is None and model.generation != self.monitor.generation):
            return self._build()
        return model

    def current(self, timeout: float = 30.0) -> Model:
        """A model of the cache as it is now, waiting for the background build (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while (model := self.get()).generation != self.monitor.generation:
            if time.monotonic() > deadline:
                raise TimeoutError("the status model did not catch up with the health cache")
            time.sleep(0.01)
        return model


def units_now(payload: dict[str, Any], model: Model) -> list[dict[str, Any]]:
    """Each unit (then each retired name) as /health judges it now, with what the model knows of it."""
    worst: dict[str, str] = {}
    rank = {"ok": 0, "warning": 1, "critical": 2}
    for c in payload["checks"]:
        name = c.get("database")
        if name is not None and rank[c["status"]] >= rank[worst.get(name, "ok")]:
            worst[name] = c["status"]
    rows = []
    for expected, group in ((True, payload["databases"]), (False, payload["retired"])):
        for name, live in group.items():
            unit = model.unit(name)
            rows.append({
                "name": name,
                "kind": live.get("kind", "database"),
                "expected": expected,
                "status": worst.get(name, "ok"),
                "last_success": live.get("last_success"),
                "last_run": live.get("last_run"),
                "copies": unit.copies if unit else [],
                "next_run_at": payload["next_run_at"] if expected else None,
                "last_drill": unit.last_drill if unit else None,
            })
    return rows
