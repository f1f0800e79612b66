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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.catalog import Entry, ReadCache, load_catalog
from app.coordination import slot_of
from app.durations import format_duration, format_size
from app.errors import SidecarError
from app.identity import ClusterId, server_identity
from app.identity import of_manifest as identity_of
from app.logs import mask
from app.manifest import SANITY_PREFIX, Manifest, utc_iso
from app.schedule_spec import Schedule
from app.settings import Settings
from app.targets.base import Target, TargetError
from app.units import Unit, expected_units, is_dynamic, static_units

log = logging.getLogger(__name__)

OK, WARNING, CRITICAL = "ok", "warning", "critical"
WITHHELD = "details withheld: HEALTH_DETAIL=minimal"
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
    read_mono: float | None = None  # monotonic end of the last successful read
    #: manifests and drill records already fetched: a refresh GETs only what is new or replaced
    cache: ReadCache = field(default_factory=ReadCache)


@dataclass
class DatabaseView:
    """One unit's standing (a database, ``_globals`` or the files archive): its newest good backup, its newest
    run of any outcome, and what else is known about them."""

    name: str
    last_good: Manifest | None = None
    last_run: Manifest | None = None
    last_run_state: str | None = None  # ok | failed | broken
    kind: str = "database"
    #: False for a retired name: backups exist, but it is no longer a unit of the job
    expected: bool = True
    #: configured targets that were read and lack an intact copy of ``last_good``
    missing_copies: list[str] = field(default_factory=list)
    #: ok manifests dated ahead of this host's clock by more than CLOCK_SKEW_TOLERANCE (never the newest)
    future: list[Manifest] = field(default_factory=list)
    #: VERIFY_AFTER_BACKUP found these copies of ``last_good`` bad: (target, detail)
    verify_failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Tally:
    """One walk over the cached entries (HealthMonitor._tally): per database its newest good backup and newest
    run, and per backup ID where it is listed and held; read-only once built."""

    good: dict[str, Manifest] = field(default_factory=dict)
    runs: dict[str, tuple[Manifest, str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    future: dict[str, dict[str, Manifest]] = field(default_factory=dict)
    foreign: dict[str, dict[str, Manifest]] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)  # backup ID -> targets holding an intact copy
    listed: dict[str, set[str]] = field(default_factory=dict)  # backup ID -> targets holding its manifest
    #: the tally is right for a cutoff in [newest_past, oldest_future)
    newest_past: datetime = datetime.min.replace(tzinfo=UTC)
    oldest_future: datetime = datetime.max.replace(tzinfo=UTC)


@dataclass
class Snapshot:
    databases: list[DatabaseView]
    targets: list[TargetView]
    heartbeat_age_s: float | None
    running_since: datetime | None
    next_run_at: datetime | None
    job_error: tuple[datetime, str] | None
    loaded: bool  # at least one target has been read once
    #: names that are no longer units but still have backups (information only)
    retired: list[DatabaseView] = field(default_factory=list)
    #: backups of another cluster, per database name
    foreign: dict[str, list[Manifest]] = field(default_factory=dict)
    cluster: ClusterId | None = None
    #: why the set of databases (POSTGRES_DB=*) could not be read from the server
    units_error: str | None = None
    schedule: Schedule | None = None
    watching_since: datetime | None = None
    wal: Any = None  # WAL_ARCHIVE: the archiver's WalStatus (app/walstatus.py)
    newest_base: Manifest | None = None  # the newest good base backup on any target


@dataclass
class Check:
    name: str
    status: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: the message for HEALTH_DETAIL=minimal (no hosts, users, buckets, paths); None: withheld there
    public: str | None = None

    def to_dict(self, minimal: bool = False) -> dict[str, Any]:
        if minimal:
            text = self.public if self.public is not None else f"{self.status} ({WITHHELD})"
            return {"name": self.name, "status": self.status, "message": mask(text), **self.extra}
        return {"name": self.name, "status": self.status, "message": mask(self.message), **self.extra}


@dataclass(frozen=True)
class RunEvent:
    """What a job of this process did that no manifest records: a skip (lock, claim, slot, overrun) or a job
    that failed before any unit. Kept in memory, bounded, for the status page's recent runs."""

    at: datetime
    outcome: str  # skipped | failed
    reason: str
    kind: str | None = None  # the skip's kind
    slot: str | None = None


#: How many skips, job errors and runs of this process the monitor remembers (the status page's recent runs).
HISTORY_LEN = 500


#: A target lacking the newest backup's copy is judged only when it was read this long after the copy was
#: first seen elsewhere: a replica writes its targets one after the other.
COPY_GRACE_S = 5.0
#: Scheduled slots in a row without a backup (skipped for any reason, or never run) that make a WARNING and
#: a CRITICAL.
MISSED_WARN, MISSED_CRIT = 2, 3


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
        schedule: Schedule | None = None,
        read_server: bool = True,
    ) -> None:
        self.settings = settings
        self.static_units = static_units(settings)
        self.dynamic = is_dynamic(settings)
        self.configured = [u.name for u in self.static_units]
        self.any_database = self.dynamic
        self.views = [TargetView(t) for t in targets]
        self.refresh_s = refresh_s
        self.stall_s = stall_s
        self.tick_limit_s = tick_limit_s
        self.watch_loop = watch_loop
        self.schedule = schedule
        self.read_server = read_server
        self.heartbeat: float | None = None  # monotonic, written by the loop each tick
        self.started = time.monotonic()
        self.started_wall = datetime.now(UTC)
        self.next_run_at: datetime | None = None
        self.running_since: datetime | None = None
        self.units: list[Unit] | None = None if self.dynamic else list(self.static_units)
        self.units_error: str | None = None
        self.cluster: ClusterId | None = None
        self._local: dict[str, Manifest] = {}  # runs of this process, also those whose manifest was not stored
        self._verified: dict[str, list[tuple[str, bool, str]]] = {}
        self._first_seen: dict[str, float] = {}  # backup ID -> monotonic time a target first showed it
        self._job_error: tuple[datetime, str] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._server_busy = False
        self._last_status: str | None = None
        #: bumped whenever what the cache holds changed (a target read, a finished job); status page rebuilds
        self.generation = 0
        #: called (on the thread that changed it) after each change, e.g. app.status rebuilding its model
        self.change_listeners: list[Callable[[], object]] = []
        self._events: deque[RunEvent] = deque(maxlen=HISTORY_LEN)
        self._local_runs: deque[Manifest] = deque(maxlen=HISTORY_LEN)
        self._tally_cache: tuple[tuple[int, ClusterId | None], _Tally] | None = None
        #: WAL_ARCHIVE=true: a copy of the archiver's status (set by the runtime)
        self.wal_status: Any = None

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
        """Start a read of every target (and of the server: identity, databases) that has none in flight;
        wait up to ``wait`` s for them to end."""
        threads = []
        for view in self.views:
            with self._lock:
                if view.busy_since is not None:
                    continue
                view.busy_since = time.monotonic()
            t = threading.Thread(target=self._read, args=(view,), name=f"health-{view.target.name}", daemon=True)
            t.start()
            threads.append(t)
        if self.read_server and not self._server_busy:
            self._server_busy = True
            t = threading.Thread(target=self._read_server, name="health-server", daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + wait
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _read_server(self) -> None:
        """This cluster's identity and, with POSTGRES_DB=*, which databases it has now (both cached)."""
        try:
            try:
                self.cluster = server_identity(self.settings)
            except SidecarError as exc:
                log.debug("health: cannot read the server's identity: %s", exc)
            if self.dynamic:
                try:
                    self.units = expected_units(self.settings)
                    self.units_error = None
                except SidecarError as exc:
                    self.units_error = mask(str(exc)).splitlines()[0]
        finally:
            self._server_busy = False

    def _read(self, view: TargetView) -> None:
        entries: list[Entry] | None = None
        error: str | None = None
        try:
            view.target.check()  # a missing mount or bucket lists as "empty": say what is wrong instead
            catalog = load_catalog([view.target], cache=view.cache)
            error = catalog.errors.get(view.target.name)
            if error is None:
                entries = catalog.entries
        except TargetError as exc:
            error = str(exc)
        except Exception as exc:  # a bug in one target's reader must not stop the health thread
            error = f"{exc.__class__.__name__}: {exc}"
        free = view.target.free_bytes() if error is None else None
        with self._lock:
            now = time.monotonic()
            if entries is not None:
                view.entries = entries
                view.read_mono = now
                for entry in entries:
                    if entry.copies.get(view.target.name):
                        self._first_seen.setdefault(entry.id, now)
            view.error = error
            view.free_bytes = free
            view.read_at = datetime.now(UTC)
            view.busy_since = None
            self.generation += 1
        self._changed()

    def _changed(self) -> None:
        """Tell the listeners; the caller bumped ``generation`` under the lock with the change itself."""
        for listener in list(self.change_listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not stop the health thread
                log.exception("a health change listener failed")

    # --- what the runtime tells us ------------------------------------------------------------------
    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def job_started(self) -> None:
        self.running_since = datetime.now(UTC).replace(microsecond=0)

    def job_finished(self, manifests: Sequence[Manifest], error: str | None = None,
                     verified: dict[str, list[tuple[str, bool, str]]] | None = None,
                     skipped: Sequence[tuple[str, str]] = (), slot: str | None = None) -> None:
        """A job ended: its manifests (also those no target took), the job's own error, VERIFY_AFTER_BACKUP's
        findings, and its skips as (kind, why)."""
        now = datetime.now(UTC).replace(microsecond=0)
        with self._lock:
            for m in manifests:
                self._local[m.database] = m
                self._local_runs.append(replace(m, contents=None, database_properties=None))  # kept light
                self._first_seen.setdefault(m.id, time.monotonic())
            self._verified.update(verified or {})
            self._job_error = (now, error) if error else None
            self._events.extend(RunEvent(now, "skipped", why, kind, slot) for kind, why in skipped)
            if error:
                self._events.append(RunEvent(now, "failed", error, None, slot))
            self.running_since = None
            self.generation += 1
        self._changed()
        self.refresh_soon()

    def record_skip(self, kind: str, why: str, slot: str | None = None) -> None:
        """A run skipped before it became a job (an overrun: the previous backup is still running)."""
        with self._lock:
            self._events.append(RunEvent(datetime.now(UTC).replace(microsecond=0), "skipped", why, kind, slot))
            self.generation += 1
        self._changed()

    def history(self) -> tuple[list[RunEvent], list[Manifest]]:
        """This process's skips and job errors, and its runs' manifests, oldest first (bounded)."""
        with self._lock:
            return list(self._events), list(self._local_runs)

    # --- evaluation ---------------------------------------------------------------------------------
    def snapshot(self, now: datetime | None = None) -> Snapshot:
        now = now or datetime.now(UTC)
        tolerance = timedelta(seconds=self.settings.health.skew_tolerance_s)
        with self._lock:
            views = [TargetView(v.target, v.entries, v.error, v.free_bytes, v.read_at, v.busy_since, v.read_mono)
                     for v in self.views]
            local = dict(self._local)
            verified = dict(self._verified)
            first_seen = dict(self._first_seen)
            job_error = self._job_error
            generation = self.generation
        cluster, units = self.cluster, self.units
        loaded = any(v.entries is not None for v in views)
        tally = self._tally(views, local, cluster, now + tolerance, generation)
        good, runs, kinds, future, foreign = tally.good, tally.runs, tally.kinds, tally.future, tally.foreign
        listed, holders = tally.listed, tally.holders
        if units is not None:
            expected = [(u.name, u.kind) for u in units]
        else:  # POSTGRES_DB=* not read from the server yet: whatever the targets hold, plus the named units
            expected = [(u.name, u.kind) for u in self.static_units]
            expected += sorted((n, kinds.get(n, "database")) for n in set(good) | set(runs)
                               if n not in {e[0] for e in expected})
        names = {n for n, _ in expected}
        copies = (listed, holders, first_seen)
        databases = [self._view(n, k, good, runs, future, views, copies, verified) for n, k in expected]
        retired = [self._view(n, kinds.get(n, "database"), good, runs, future, views, copies, verified,
                              expected=False)
                   for n in sorted((set(good) | set(runs) | set(future)) - names)]
        heartbeat_age = None if self.heartbeat is None else time.monotonic() - self.heartbeat
        return Snapshot(databases, views, heartbeat_age, self.running_since, self.next_run_at, job_error, loaded,
                        retired, {k: list(v.values()) for k, v in foreign.items()}, cluster, self.units_error,
                        self.schedule, self.started_wall,
                        *_wal_snapshot(self.wal_status, views))

    def _tally(self, views: list[TargetView], local: dict[str, Manifest], cluster: ClusterId | None,
               cutoff: datetime, generation: int) -> _Tally:
        """What the cached manifests say, walked once per change of the cache (a year of history for ten
        databases is thousands of entries: /health and the status page must not walk them per request).

        A tally stays right while no entry crosses ``cutoff`` (now + CLOCK_SKEW_TOLERANCE: newer is "future")."""
        cached = self._tally_cache
        if (cached is not None and cached[0] == (generation, cluster)
                and cached[1].newest_past <= cutoff < cached[1].oldest_future):
            return cached[1]
        t = _Tally()
        for view in views:
            for entry in view.entries or []:
                m = entry.manifest
                if m.kind == "base":  # point-in-time recovery has its own checks (_wal_checks)
                    continue
                if cluster is not None and not cluster.matches(m):
                    t.foreign.setdefault(m.database, {})[m.id] = m
                    continue
                at = m.finished_at or m.started_at
                if at > cutoff:
                    t.future.setdefault(m.database, {})[m.id] = m
                    t.oldest_future = min(t.oldest_future, at)
                    continue
                t.newest_past = max(t.newest_past, at)
                t.kinds.setdefault(m.database, m.kind)
                t.listed.setdefault(m.id, set()).add(view.target.name)
                if entry.copies.get(view.target.name):
                    t.holders.setdefault(m.id, set()).add(view.target.name)
                if entry.good and (m.database not in t.good or m.started_at > t.good[m.database].started_at):
                    t.good[m.database] = m
                state = t.runs.get(m.database)
                if (
                    state is None
                    or m.started_at > state[0].started_at
                    or (m.started_at == state[0].started_at and entry.good)
                ):
                    t.runs[m.database] = (m, entry.status)
        for name, m in local.items():  # a newer local failure wins over older manifests
            state = t.runs.get(name)
            if state is None or m.started_at > state[0].started_at:
                t.runs[name] = (m, "ok" if m.ok else "failed")
        self._tally_cache = ((generation, cluster), t)
        return t

    @staticmethod
    def _view(name: str, kind: str, good: dict[str, Manifest], runs: dict[str, tuple[Manifest, str]],
              future: dict[str, dict[str, Manifest]], views: list[TargetView],
              copies: tuple[dict[str, set[str]], dict[str, set[str]], dict[str, float]],
              verified: dict[str, list[tuple[str, bool, str]]], expected: bool = True) -> DatabaseView:
        run = runs.get(name)
        last_good = good.get(name)
        view = DatabaseView(name, last_good, run[0] if run else None, run[1] if run else None, kind, expected,
                            future=sorted(future.get(name, {}).values(), key=lambda m: m.started_at))
        if last_good is not None:
            listed, holders, first_seen = copies
            seen = first_seen.get(last_good.id)
            for v in views:
                if v.error is not None or v.read_mono is None or v.target.name in holders.get(last_good.id, set()):
                    continue
                # its manifest there but no intact artifact: missing now; no manifest there at all: only once
                # the target was read a while after another target showed the backup (a replica may be writing)
                if v.target.name in listed.get(last_good.id, set()) or (
                        seen is not None and v.read_mono > seen + COPY_GRACE_S):
                    view.missing_copies.append(v.target.name)
            view.verify_failed = [(where, detail) for where, ok, detail in verified.get(last_good.id, []) if not ok]
        return view

    def payload(self, now: datetime | None = None) -> dict[str, Any]:
        """The /health document (SPEC): status, code, last_success, last_run, next_run_at, checks."""
        now = now or datetime.now(UTC)
        return evaluate(self.snapshot(now), self.settings, now, self._loop_limits())

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
    minimal = settings.health.detail == "minimal"
    checks: list[Check] = []
    if watch_loop:
        checks.append(_scheduler_check(snap, tick_limit_s))
    if snap.job_error is not None:
        at, error = snap.job_error
        checks.append(Check("job", CRITICAL, f"the backup job at {utc_iso(at)} failed: {error}",
                            public=f"the backup job at {utc_iso(at)} failed"))
    if snap.units_error is not None:
        checks.append(Check("databases", WARNING, f"cannot list the databases for POSTGRES_DB=*: {snap.units_error}",
                            public="cannot list the databases for POSTGRES_DB=*"))
    if not snap.databases:  # POSTGRES_DB=* and nothing found yet: no backup is not "ok"
        text = "no backup yet" if snap.loaded else "no target could be read yet"
        checks.append(Check("backup_age", WARNING, text, public=text))
    for db in snap.databases:
        checks.append(_age_check(db, snap.loaded, now, warn_s, crit_s))
        if db.last_run is not None:
            checks.append(_run_check(db))
        checks += _copy_checks(db)
        if snap.schedule is not None:
            missed = _missed_check(db, snap, settings, now)
            if missed is not None:
                checks.append(missed)
    for db in snap.databases + snap.retired:
        if db.future:
            checks.append(_future_check(db, now))
    for db in snap.retired:
        checks.append(_retired_check(db, is_dynamic(settings)))
    for name, found in sorted(snap.foreign.items()):
        checks.append(_foreign_check(name, found, snap.cluster))
    checks += drill_checks(snap)
    for view in snap.targets:
        checks.append(_target_check(view, stall_s))
    needed = sum(db.last_good.size_bytes for db in snap.databases if db.last_good)
    for view in snap.targets:
        if view.free_bytes is not None and needed:
            checks.append(_space_check(view, needed))
    checks += _wal_checks(snap, settings, now)
    status = max((c.status for c in checks), key=_RANK.__getitem__, default=OK)
    per_db = {
        db.name: {"kind": db.kind, "last_success": _success_doc(db.last_good, now), "last_run": _run_doc(db, minimal)}
        for db in snap.databases
    }
    doc = {
        "status": status,
        "code": CODES[status],
        "last_success": _overall_success(snap.databases, now),
        "last_run": _overall_run(snap.databases, minimal),
        "next_run_at": utc_iso(snap.next_run_at),
        "running": {"since": utc_iso(snap.running_since)} if snap.running_since else None,
        "checks": [c.to_dict(minimal) for c in checks],
        "databases": per_db,
        "retired": {db.name: {"kind": db.kind, "last_success": _success_doc(db.last_good, now)}
                    for db in snap.retired},
        "thresholds": {"warn_age_seconds": int(warn_s), "crit_age_seconds": int(crit_s)},
        **({"wal": _wal_doc(snap, now)} if snap.wal is not None else {}),
    }
    if not minimal:
        doc["host"] = settings.hostname
    return doc


def _copy_checks(db: DatabaseView) -> list[Check]:
    """SPEC: CRITICAL when a configured target lacks a copy (of the newest backup), or its copy read back bad."""
    m = db.last_good
    if m is None:
        return []
    extra = {"database": db.name}
    out = []
    if db.missing_copies:
        where = ", ".join(db.missing_copies)
        out.append(Check("copies", CRITICAL, f"{db.name}: the newest backup {m.id} has no intact copy on {where} "
                         "(hint: `backup-sidecar verify` it; the next backup writes every target again)", extra,
                         public=f"{db.name}: the newest backup {m.id} lacks a copy on {where}"))
    if db.verify_failed:
        detail = "; ".join(f"{where}: {text}" for where, text in db.verify_failed)
        targets = ", ".join(where for where, _ in db.verify_failed)
        out.append(Check("verify", CRITICAL, f"{db.name}: the copy of {m.id} read back after the backup is bad: "
                         f"{detail}", extra, public=f"{db.name}: the copy of {m.id} on {targets} is bad"))
    if m.sanity:
        out.append(Check("sanity", WARNING, f"{db.name}: {m.id} looks wrong: {'; '.join(m.sanity)}", extra,
                         public=f"{db.name}: {m.id} looks wrong: {'; '.join(m.sanity)}"))
    return out


def _missed_check(db: DatabaseView, snap: Snapshot, settings: Settings, now: datetime) -> Check | None:
    """Scheduled slots in a row that passed without a backup (a skip for any reason counts): like a missed
    backup, a WARNING and then a CRITICAL, whatever the age thresholds say for a frequent schedule."""
    schedule = snap.schedule
    if schedule is None or not schedule.aligned:
        return None
    tolerance = settings.health.skew_tolerance_s
    covered = snap.watching_since or now
    if db.last_good is not None:
        covered = max(covered, db.last_good.started_at + timedelta(seconds=tolerance))
    grace = timedelta(seconds=settings.dump.timeout_s + tolerance)
    missed: list[datetime] = []
    fire = schedule.next_run(covered)
    while fire + grace <= now and len(missed) < 100:
        missed.append(fire)
        fire = schedule.next_run(fire)
    extra = {"database": db.name, "missed_slots": len(missed)}
    if len(missed) < MISSED_WARN:
        text = f"{db.name}: no scheduled slot missed" if not missed else \
            f"{db.name}: the slot {slot_of(missed[0])} passed without a backup"
        return Check("slots", OK, text, extra, public=text)
    status = CRITICAL if len(missed) >= MISSED_CRIT else WARNING
    text = (f"{db.name}: {len(missed)} scheduled slots in a row passed without a backup, the last at "
            f"{slot_of(missed[-1])} (hint: the log says why each was skipped or failed; "
            "backup_sidecar_skips_total counts the skips)")
    return Check("slots", status, text, extra, public=text)


def _future_check(db: DatabaseView, now: datetime) -> Check:
    m = db.future[-1]
    ahead = ((m.finished_at or m.started_at) - now).total_seconds()
    text = (f"{db.name}: {len(db.future)} backup(s) dated in the future, the latest {m.id} by "
            f"{format_duration(ahead)}; not counted as the newest (hint: a host's clock is wrong, check NTP)")
    return Check("clock_skew", WARNING, f"{text}; written by {m.host or '?'}", {"database": db.name}, public=text)


def _retired_check(db: DatabaseView, dynamic: bool) -> Check:
    where = "not on the server any more, or excluded" if dynamic else "not in POSTGRES_DB any more"
    last = f"its last backup {db.last_good.id} stays under retention" if db.last_good else "it has no good backup"
    text = f"{db.name}: retired ({where}); {last}"
    return Check("retired", OK, text, {"database": db.name}, public=text)


def _foreign_check(name: str, found: list[Manifest], cluster: ClusterId | None) -> Check:
    other = sorted({identity_of(m).describe() for m in found})
    mine = cluster.describe() if cluster else "this cluster"
    text = (f"{name}: {len(found)} backup(s) on the targets come from another cluster ({', '.join(other)}), not "
            f"{mine}; they are ignored here (hint: give each cluster its own S3_PREFIX or NAS_PATH)")
    return Check("foreign", WARNING, text, {"database": name},
                 public=f"{name}: {len(found)} backup(s) on the targets come from another cluster and are ignored")


def _wal_snapshot(wal_status: Any, views: list[TargetView]) -> tuple[Any, Manifest | None]:
    """WAL_ARCHIVE: the archiver's status and the newest good base backup the targets hold."""
    if wal_status is None:
        return None, None
    bases = [e.manifest for v in views for e in v.entries or [] if e.manifest.kind == "base" and e.good]
    return wal_status(), max(bases, key=lambda m: m.started_at, default=None)


def _wal_checks(snap: Snapshot, settings: Settings, now: datetime) -> list[Check]:
    if snap.wal is None:
        return []
    from app.walstatus import wal_checks

    w = settings.wal
    return [Check(c.name, c.status, c.message) for c in wal_checks(
        snap.wal, snap.newest_base, w.warn_age_s, w.crit_age_s, w.slot_warn_bytes, w.slot_crit_bytes, now)]


def _wal_doc(snap: Snapshot, now: datetime) -> dict[str, Any]:
    from app.walstatus import wal_doc

    return wal_doc(snap.wal, now)


def _scheduler_check(snap: Snapshot, tick_limit_s: float) -> Check:
    if snap.heartbeat_age_s is None:
        text = "the scheduler loop has not started"
        return Check("scheduler", WARNING, text, public=text)
    if snap.heartbeat_age_s > tick_limit_s:
        text = f"no scheduler tick for {format_duration(snap.heartbeat_age_s)}"
        return Check("scheduler", CRITICAL, text, public=text)
    nxt = f"; next run at {utc_iso(snap.next_run_at)}" if snap.next_run_at else ""
    running = f"; a backup is running since {utc_iso(snap.running_since)}" if snap.running_since else ""
    return Check("scheduler", OK, f"ticking{running}{nxt}", public=f"ticking{running}{nxt}")


def _age_check(db: DatabaseView, loaded: bool, now: datetime, warn_s: float, crit_s: float) -> Check:
    extra = {"database": db.name, "kind": db.kind}
    if db.last_good is None:
        text = f"{db.name}: no target could be read yet" if not loaded else f"no backup of {db.name} yet"
        return Check("backup_age", WARNING, text, extra, public=text)
    age = _age(db.last_good, now)
    text = f"last backup of {db.name} is {format_duration(age)} old"
    status = OK
    if age > crit_s:
        status, text = CRITICAL, f"{text}, older than HEALTH_CRIT_AGE {format_duration(crit_s)}"
    elif age > warn_s:
        status, text = WARNING, f"{text}, older than HEALTH_WARN_AGE {format_duration(warn_s)}"
    return Check("backup_age", status, text, extra, public=text)


def _run_check(db: DatabaseView) -> Check:
    m = db.last_run
    assert m is not None
    extra = {"database": db.name}
    if db.last_run_state == "failed":
        error = (m.error or "no error recorded").strip()
        # SPEC: a failed last run is CRITICAL, an interrupted one (a stop during a rollout) included; the
        # message says so, and the next good backup clears it.
        return Check("last_run", CRITICAL, f"{db.name}: {m.id} failed: {error}", extra,
                     public=f"{db.name}: {m.id} failed")
    if db.last_run_state == "broken":
        # no copy anywhere can be restored: as good as a failed run (SPEC: CRITICAL when a copy is missing)
        text = f"{db.name}: {m.id} says ok but its artifact is missing or has the wrong size on every target"
        return Check("last_run", CRITICAL, text, extra, public=text)
    other = [w for w in m.warnings if not w.startswith(SANITY_PREFIX)]  # sanity warnings have their own check
    if other:  # ok, but something (metadata the backup role cannot read) is not in it
        return Check("last_run", WARNING, f"{db.name}: {m.id} ok with {len(other)} warning(s): {other[0]}", extra,
                     public=f"{db.name}: {m.id} ok with {len(other)} warning(s)")
    return Check("last_run", OK, f"{db.name}: {m.id} ok", extra, public=f"{db.name}: {m.id} ok")


def last_drills(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """The newest restore drill record (app/drills.py) per database, from the cached catalogs."""
    newest: dict[str, dict[str, Any]] = {}
    for view in snap.targets:
        for entry in view.entries or []:
            drill, name = entry.drill, entry.manifest.database
            if drill and (name not in newest or str(drill.get("started_at")) > str(newest[name].get("started_at"))):
                newest[name] = drill
    return newest


def drill_checks(snap: Snapshot) -> list[Check]:
    """SPEC: CRITICAL when the last drill failed; OK with its RTO otherwise (no check before the first drill)."""
    checks = []
    for name, drill in sorted(last_drills(snap).items()):
        extra = {"database": name}
        if drill.get("status") != "ok":
            checks.append(Check("last_drill", CRITICAL, f"{name}: the drill of {drill.get('backup_id')} at "
                                f"{drill.get('started_at')} failed: {drill.get('error') or '?'}", extra,
                                public=f"{name}: the drill of {drill.get('backup_id')} failed"))
        else:
            text = (f"{name}: {drill.get('backup_id')} restored and compared at {drill.get('started_at')}, "
                    f"RTO {drill.get('rto_s')}s")
            checks.append(Check("last_drill", OK, text, extra, public=text))
    return checks


def _target_check(view: TargetView, stall_s: float) -> Check:
    name = f"target:{view.target.name}"
    where, short = view.target.describe(), view.target.name
    if view.busy_since is not None:
        waiting = time.monotonic() - view.busy_since
        if waiting > stall_s:
            cached = "" if view.entries is None else f"; showing what it held at {utc_iso(view.read_at)}"
            text = f"no answer for {format_duration(waiting)}{cached}"
            return Check(name, WARNING, f"{where}: {text}", public=f"{short}: {text}")
    if view.error is not None:
        return Check(name, WARNING, f"{where}: {view.error}", public=f"{short}: cannot be read")
    if view.entries is None:
        return Check(name, OK, f"{where}: being read", public=f"{short}: being read")
    text = f"{len(view.entries)} backup(s) listed at {utc_iso(view.read_at)}"
    return Check(name, OK, f"{where}: {text}", public=f"{short}: {text}")


def _space_check(view: TargetView, needed: int) -> Check:
    free = view.free_bytes or 0
    name = f"space:{view.target.name}"
    text = f"{view.target.describe()}: {format_size(free)} free, the last backup took {format_size(needed)}"
    public = f"{view.target.name}: {format_size(free)} free, the last backup took {format_size(needed)}"
    if free < needed:
        return Check(name, WARNING, f"{text} (hint: free space or lower retention before the next run)",
                     public=public)
    return Check(name, OK, text, public=public)


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


def _run_doc(db: DatabaseView, minimal: bool = False) -> dict[str, Any] | None:
    m = db.last_run
    if m is None:
        return None
    error = mask(m.error) if m.error else None
    if error and minimal:
        error = f"failed ({WITHHELD})"
    return {
        "id": m.id,
        "database": m.database,
        "status": db.last_run_state or m.status,
        "finished_at": utc_iso(m.finished_at),
        "duration_s": m.duration_s,
        "error": error,
    }


def _overall_success(databases: list[DatabaseView], now: datetime) -> dict[str, Any] | None:
    """The stalest database's newest backup: the one the age verdict is about. None if one has none."""
    if not databases or any(db.last_good is None for db in databases):
        return None
    stalest = min(databases, key=lambda db: db.last_good.finished_at or db.last_good.started_at)  # type: ignore
    return _success_doc(stalest.last_good, now)


def _overall_run(databases: list[DatabaseView], minimal: bool = False) -> dict[str, Any] | None:
    """A failed database's last run if there is one, else the newest run."""
    ran = [db for db in databases if db.last_run is not None]
    if not ran:
        return None
    failed = [db for db in ran if db.last_run_state == "failed"]
    pick = max(failed or ran, key=lambda db: db.last_run.started_at)  # type: ignore[union-attr]
    return _run_doc(pick, minimal)
