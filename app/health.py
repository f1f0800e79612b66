"""The health verdict: what the targets' manifests say, plus the scheduler loop's heartbeat.

Reading targets can take seconds or hang (an S3 endpoint that accepts and never answers, a stale NFS
mount), so /health never reads them: each target is read by its own background thread into a cache, on a
timer and right after every run, and /health only evaluates that cache. A target whose read is overdue is
reported as a check, while the last good view of it keeps serving. Because ages come from the manifests,
the verdict is right after a restart and on a replica that never ran the backup itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.catalog import Entry, load_catalog
from app.durations import format_duration, format_size
from app.logs import mask
from app.manifest import Manifest, utc_iso
from app.settings import Settings
from app.targets.base import Target, TargetError

log = logging.getLogger(__name__)

OK, WARNING, CRITICAL = "ok", "warning", "critical"
CODES = {OK: 0, WARNING: 1, CRITICAL: 2}
_RANK = {OK: 0, WARNING: 1, CRITICAL: 2}


@dataclass
class TargetView:
    """The cached reading of one target; replaced field by field under the monitor's lock."""

    target: Target
    entries: list[Entry] | None = None  # None: never read successfully
    error: str | None = None
    free_bytes: int | None = None
    read_at: datetime | None = None
    busy_since: float | None = None  # monotonic start of a read in flight


@dataclass
class DatabaseView:
    """One database's standing: its newest good backup and its newest run of any outcome."""

    name: str
    last_good: Manifest | None = None
    last_run: Manifest | None = None
    last_run_state: str | None = None  # ok | failed | broken


@dataclass
class Snapshot:
    databases: list[DatabaseView]
    targets: list[TargetView]
    heartbeat_age_s: float | None
    running_since: datetime | None
    next_run_at: datetime | None
    job_error: tuple[datetime, str] | None
    loaded: bool  # at least one target has been read once


@dataclass
class Check:
    name: str
    status: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": mask(self.message), **self.extra}


class HealthMonitor:
    """Caches what the targets hold and turns it, with the loop's heartbeat, into the /health payload."""

    def __init__(
        self,
        settings: Settings,
        targets: Sequence[Target],
        *,
        refresh_s: float = 60.0,
        stall_s: float = 5.0,
        tick_limit_s: float = 60.0,
        watch_loop: bool = True,
    ) -> None:
        self.settings = settings
        self.configured = [d for d in settings.db.databases if d != "*"]
        self.any_database = "*" in settings.db.databases
        self.views = [TargetView(t) for t in targets]
        self.refresh_s = refresh_s
        self.stall_s = stall_s
        self.tick_limit_s = tick_limit_s
        self.watch_loop = watch_loop
        self.heartbeat: float | None = None  # monotonic, written by the loop each tick
        self.started = time.monotonic()
        self.next_run_at: datetime | None = None
        self.running_since: datetime | None = None
        self._local: dict[str, Manifest] = {}  # runs of this process, also those whose manifest was not stored
        self._job_error: tuple[datetime, str] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None

    # --- background reading -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._refresher, name="health-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def refresh_soon(self) -> None:
        """Read the targets again now (after a run), without waiting for the timer."""
        self._wake.set()

    def _refresher(self) -> None:
        while not self._stop:
            self._wake.clear()
            self.refresh_all()
            self._wake.wait(self.refresh_s)

    def refresh_all(self, wait: float = 0.0) -> None:
        """Start a read of every target that has none in flight; wait up to ``wait`` s for them to end."""
        threads = []
        for view in self.views:
            with self._lock:
                if view.busy_since is not None:
                    continue
                view.busy_since = time.monotonic()
            t = threading.Thread(target=self._read, args=(view,), name=f"health-{view.target.name}", daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + wait
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _read(self, view: TargetView) -> None:
        entries: list[Entry] | None = None
        error: str | None = None
        try:
            view.target.check()  # a missing mount or bucket lists as "empty": say what is wrong instead
            catalog = load_catalog([view.target])
            error = catalog.errors.get(view.target.name)
            if error is None:
                entries = catalog.entries
        except TargetError as exc:
            error = str(exc)
        except Exception as exc:  # a bug in one target's reader must not stop the health thread
            error = f"{exc.__class__.__name__}: {exc}"
        free = view.target.free_bytes() if error is None else None
        with self._lock:
            if entries is not None:
                view.entries = entries
            view.error = error
            view.free_bytes = free
            view.read_at = datetime.now(UTC)
            view.busy_since = None

    # --- what the runtime tells us ------------------------------------------------------------------
    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def job_started(self) -> None:
        self.running_since = datetime.now(UTC).replace(microsecond=0)

    def job_finished(self, manifests: Sequence[Manifest], error: str | None = None) -> None:
        with self._lock:
            for m in manifests:
                self._local[m.database] = m
            self._job_error = (datetime.now(UTC).replace(microsecond=0), error) if error else None
            self.running_since = None
        self.refresh_soon()

    # --- evaluation ---------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            views = [
                TargetView(v.target, v.entries, v.error, v.free_bytes, v.read_at, v.busy_since) for v in self.views
            ]
            local = dict(self._local)
            job_error = self._job_error
        loaded = any(v.entries is not None for v in views)
        good: dict[str, Manifest] = {}
        runs: dict[str, tuple[Manifest, str]] = {}
        for view in views:
            for entry in view.entries or []:
                m = entry.manifest
                if m.kind != "database" and m.database not in self.configured:
                    continue
                if entry.good and (m.database not in good or m.started_at > good[m.database].started_at):
                    good[m.database] = m
                state = runs.get(m.database)
                if (
                    state is None
                    or m.started_at > state[0].started_at
                    or (m.started_at == state[0].started_at and entry.good)
                ):
                    runs[m.database] = (m, entry.status)
        for name, m in local.items():
            state = runs.get(name)
            if state is None or m.started_at > state[0].started_at:
                runs[name] = (m, "ok" if m.ok else "failed")
        names = list(self.configured)
        if self.any_database or not names:
            names += sorted(n for n in set(good) | set(runs) if n not in names)
        databases = []
        for name in names:
            run = runs.get(name)
            databases.append(DatabaseView(name, good.get(name), run[0] if run else None, run[1] if run else None))
        heartbeat_age = None if self.heartbeat is None else time.monotonic() - self.heartbeat
        return Snapshot(databases, views, heartbeat_age, self.running_since, self.next_run_at, job_error, loaded)

    def payload(self, now: datetime | None = None) -> dict[str, Any]:
        """The /health document (SPEC): status, code, last_success, last_run, next_run_at, checks."""
        return evaluate(self.snapshot(), self.settings, now or datetime.now(UTC), self._loop_limits())

    def _loop_limits(self) -> tuple[bool, float, float]:
        return self.watch_loop, self.tick_limit_s, self.stall_s

    def transition(self) -> tuple[str | None, str, dict[str, Any]] | None:
        """(old, new, payload) when the status changed since the last call; None otherwise."""
        doc = self.payload()
        new = doc["status"]
        old, self._last_status = self._last_status, new
        return (old, new, doc) if old != new else None


def evaluate(
    snap: Snapshot, settings: Settings, now: datetime, limits: tuple[bool, float, float] = (True, 60.0, 5.0)
) -> dict[str, Any]:
    """Checks and verdict for one snapshot; pure, so every state can be tested without waiting for it."""
    watch_loop, tick_limit_s, stall_s = limits
    warn_s, crit_s = settings.health.warn_age_s, settings.health.crit_age_s
    checks: list[Check] = []
    if watch_loop:
        checks.append(_scheduler_check(snap, tick_limit_s))
    if snap.job_error is not None:
        at, error = snap.job_error
        checks.append(Check("job", CRITICAL, f"the backup job at {utc_iso(at)} failed: {error}"))
    if not snap.databases:  # POSTGRES_DB=* and nothing found yet: no backup is not "ok"
        text = "no backup yet" if snap.loaded else "no target could be read yet"
        checks.append(Check("backup_age", WARNING, text))
    for db in snap.databases:
        checks.append(_age_check(db, snap.loaded, now, warn_s, crit_s))
        if db.last_run is not None:
            checks.append(_run_check(db))
    for view in snap.targets:
        checks.append(_target_check(view, stall_s))
    needed = sum(db.last_good.size_bytes for db in snap.databases if db.last_good)
    for view in snap.targets:
        if view.free_bytes is not None and needed:
            checks.append(_space_check(view, needed))
    status = max((c.status for c in checks), key=_RANK.__getitem__, default=OK)
    per_db = {
        db.name: {"last_success": _success_doc(db.last_good, now), "last_run": _run_doc(db)} for db in snap.databases
    }
    return {
        "status": status,
        "code": CODES[status],
        "last_success": _overall_success(snap.databases, now),
        "last_run": _overall_run(snap.databases),
        "next_run_at": utc_iso(snap.next_run_at),
        "running": {"since": utc_iso(snap.running_since)} if snap.running_since else None,
        "checks": [c.to_dict() for c in checks],
        "databases": per_db,
        "thresholds": {"warn_age_seconds": int(warn_s), "crit_age_seconds": int(crit_s)},
        "host": settings.hostname,
    }


def _scheduler_check(snap: Snapshot, tick_limit_s: float) -> Check:
    if snap.heartbeat_age_s is None:
        return Check("scheduler", WARNING, "the scheduler loop has not started")
    if snap.heartbeat_age_s > tick_limit_s:
        return Check("scheduler", CRITICAL, f"no scheduler tick for {format_duration(snap.heartbeat_age_s)}")
    nxt = f"; next run at {utc_iso(snap.next_run_at)}" if snap.next_run_at else ""
    running = f"; a backup is running since {utc_iso(snap.running_since)}" if snap.running_since else ""
    return Check("scheduler", OK, f"ticking{running}{nxt}")


def _age_check(db: DatabaseView, loaded: bool, now: datetime, warn_s: float, crit_s: float) -> Check:
    extra = {"database": db.name}
    if db.last_good is None:
        if not loaded:
            return Check("backup_age", WARNING, f"{db.name}: no target could be read yet", extra)
        return Check("backup_age", WARNING, f"no backup of {db.name} yet", extra)
    age = _age(db.last_good, now)
    text = f"last backup of {db.name} is {format_duration(age)} old"
    if age > crit_s:
        return Check("backup_age", CRITICAL, f"{text}, older than HEALTH_CRIT_AGE {format_duration(crit_s)}", extra)
    if age > warn_s:
        return Check("backup_age", WARNING, f"{text}, older than HEALTH_WARN_AGE {format_duration(warn_s)}", extra)
    return Check("backup_age", OK, text, extra)


def _run_check(db: DatabaseView) -> Check:
    m = db.last_run
    assert m is not None
    extra = {"database": db.name}
    if db.last_run_state == "failed":
        error = (m.error or "no error recorded").strip()
        # SPEC: a failed last run is CRITICAL, an interrupted one (a stop during a rollout) included; the
        # message says so, and the next good backup clears it.
        return Check("last_run", CRITICAL, f"{db.name}: {m.id} failed: {error}", extra)
    if db.last_run_state == "broken":
        return Check(
            "last_run",
            WARNING,
            f"{db.name}: {m.id} says ok but its artifact is missing or has the wrong size",
            extra,
        )
    return Check("last_run", OK, f"{db.name}: {m.id} ok", extra)


def _target_check(view: TargetView, stall_s: float) -> Check:
    name = f"target:{view.target.name}"
    where = view.target.describe()
    if view.busy_since is not None:
        waiting = time.monotonic() - view.busy_since
        if waiting > stall_s:
            cached = "" if view.entries is None else f"; showing what it held at {utc_iso(view.read_at)}"
            return Check(name, WARNING, f"{where}: no answer for {format_duration(waiting)}{cached}")
    if view.error is not None:
        return Check(name, WARNING, f"{where}: {view.error}")
    if view.entries is None:
        return Check(name, OK, f"{where}: being read")
    return Check(name, OK, f"{where}: {len(view.entries)} backup(s) listed at {utc_iso(view.read_at)}")


def _space_check(view: TargetView, needed: int) -> Check:
    free = view.free_bytes or 0
    name = f"space:{view.target.name}"
    text = f"{view.target.describe()}: {format_size(free)} free, the last backup took {format_size(needed)}"
    if free < needed:
        return Check(name, WARNING, f"{text} (hint: free space or lower retention before the next run)")
    return Check(name, OK, text)


def _age(m: Manifest, now: datetime) -> float:
    return max(0.0, (now - (m.finished_at or m.started_at)).total_seconds())


def _success_doc(m: Manifest | None, now: datetime) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "id": m.id,
        "database": m.database,
        "finished_at": utc_iso(m.finished_at),
        "age_seconds": int(_age(m, now)),
        "size_bytes": m.size_bytes,
        "duration_s": m.duration_s,
    }


def _run_doc(db: DatabaseView) -> dict[str, Any] | None:
    m = db.last_run
    if m is None:
        return None
    return {
        "id": m.id,
        "database": m.database,
        "status": db.last_run_state or m.status,
        "finished_at": utc_iso(m.finished_at),
        "duration_s": m.duration_s,
        "error": mask(m.error) if m.error else None,
    }


def _overall_success(databases: list[DatabaseView], now: datetime) -> dict[str, Any] | None:
    """The stalest database's newest backup: the one the age verdict is about. None if one has none."""
    if not databases or any(db.last_good is None for db in databases):
        return None
    stalest = min(databases, key=lambda db: db.last_good.finished_at or db.last_good.started_at)  # type: ignore
    return _success_doc(stalest.last_good, now)


def _overall_run(databases: list[DatabaseView]) -> dict[str, Any] | None:
    """A failed database's last run if there is one, else the newest run."""
    ran = [db for db in databases if db.last_run is not None]
    if not ran:
        return None
    failed = [db for db in ran if db.last_run_state == "failed"]
    pick = max(failed or ran, key=lambda db: db.last_run.started_at)  # type: ignore[union-attr]
    return _run_doc(pick)
