"""Restore drills: prove a backup comes back by restoring it for real, then comparing what came back with
what was dumped (the manifest's ``contents``), and record the outcome where list, /health, /metrics and
notifications see it.

A drill runs on the drill server (DRILL_DATABASE_URL; default the source server), where the sidecar may be
a superuser, in a scratch database that is always dropped. On a drill server other than the source, the
latest globals backup is applied first so owners and grantees exist. Each drill leaves a record beside the
backup's manifest (``<ID>.drill-<stamp>.json``, see app/layout.py) on every target holding the backup:

    {"backup_id", "database", "status": "ok|failed", "started_at", "finished_at", "rto_s", "server",
     "source", "compared", "problems", "error"}

``rto_s`` is the time from the start to a restored, compared database: the recovery time this backup gives.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg

from app import contents, dbadmin, layout, pg
from app.catalog import Entry, load_catalog
from app.dbadmin import DatabaseProperties
from app.errors import SidecarError
from app.globals_dump import apply_globals
from app.locks import LockBusy, run_lock
from app.logs import mask
from app.manifest import utc_iso
from app.readpath import archive_chunks
from app.restore import Options, one_transaction_fits, stream_into_database
from app.selection import pick_source
from app.settings import DatabaseSettings, Settings
from app.targets import Target, TargetError, make_targets

if TYPE_CHECKING:
    from app.notify import Notifier

log = logging.getLogger(__name__)
SCRATCH_PREFIX = "backup_sidecar_restore_test_"


@dataclass
class DrillRecord:
    backup_id: str
    database: str
    status: str  # ok | failed
    started_at: str
    finished_at: str | None = None
    rto_s: float | None = None
    server: str = ""
    source: str = ""
    compared: str = ""
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def detail(self) -> str:
        """The verify report's text for this drill."""
        if not self.ok and self.error:
            return self.error
        text = f"from {self.source}: {self.compared}, RTO {self.rto_s:.1f}s on {self.server}"
        if self.problems:
            text += "; DIFFERS: " + "; ".join(self.problems[:5])
        return text

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n").encode()

    def for_encrypted_copy(self) -> DrillRecord:
        """The record as stored beside an encrypted copy: its differences name tables with their row counts,
        which that copy's manifest seals, so they are counted there, not listed."""
        if not self.problems:
            return self
        return replace(self, problems=[f"{len(self.problems)} difference(s), not listed beside an encrypted copy "
                                       "(hint: the sidecar's log and the records beside plain copies list them)"])


def same_server(a: DatabaseSettings, b: DatabaseSettings) -> bool:
    return (a.host, a.port) == (b.host, b.port)


class Drill:
    """Drills of several backups against one drill server; globals are applied once, before the first."""

    def __init__(self, settings: Settings, targets: Sequence[Target]) -> None:
        self.settings = settings
        self.targets = list(targets)
        self.server = settings.drill.database(settings.db)
        self._globals: str | None = None  # None: not tried yet; "" done (or not needed); else the error
        self._superuser: bool | None = None

    def superuser(self) -> bool:
        """Whether the sidecar is a superuser on the drill server; if not, owners and grants are left out."""
        if self._superuser is None:
            with pg.connect(self.server, "postgres") as conn:
                row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            self._superuser = bool(row and row[0])
        return self._superuser

    def where(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def prepare(self) -> str | None:
        """Apply the latest globals on a drill server other than the source; the error line, or None."""
        if self._globals is not None:
            return self._globals or None
        self._globals = ""
        if same_server(self.server, self.settings.db):
            return None  # the owners exist: they are the source's own roles
        try:
            catalog = load_catalog(self.targets, "_globals")
            good = [e for e in catalog.good() if e.manifest.kind == "globals"]
            if not good:
                log.warning("no globals backup: objects owned by roles the drill server lacks will fail to restore "
                            "(hint: set BACKUP_GLOBALS=true)")
                return None
            entry = good[0]
            source = pick_source(entry, self.targets, None)
            apply_globals(self.server, archive_chunks(source, entry.manifest_on(source.name)))
            log.info("drill server %s: globals %s applied", self.where(), entry.id)
        except SidecarError as exc:
            self._globals = f"the globals could not be applied to the drill server {self.where()}: {mask(str(exc))}"
        return self._globals or None

    def run(self, entry: Entry, source: Target) -> DrillRecord:
        """Restore ``entry`` into a scratch database, compare, drop it; never raises for a failed drill."""
        m = entry.manifest_on(source.name)
        started = datetime.now(UTC)
        record = DrillRecord(m.id, m.database, "failed", utc_iso(started) or "", server=self.where(),
                             source=source.name)
        if m.engine_name != "postgresql":
            return _finish(self._other_engine(entry, source, record))
        problem = self.prepare()
        if problem:
            record.error = problem
            return _finish(record)
        name = f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
        t0 = time.monotonic()
        try:
            full = self.superuser()
            dbadmin.create_database(self.server, name, DatabaseProperties.from_doc(m.database_properties),
                                    owner=full, acl=full)
        except (SidecarError, psycopg.Error) as exc:
            record.error = f"cannot create the scratch database on {self.where()}: {mask(str(exc))}"
            return _finish(record)
        drop_error = None
        try:
            self._restore_and_compare(record, source, entry, name, t0)
        finally:
            try:
                dbadmin.drop_database(self.server, name)
            except SidecarError as exc:
                drop_error = mask(str(exc))
                log.error("scratch database %s was not dropped: %s", name, drop_error)
        if drop_error:
            record.status = "failed"
            record.error = f"{record.error or record.compared}; scratch database {name} could NOT be dropped: " \
                           f"{drop_error}"
        return _finish(record)

    def _other_engine(self, entry: Entry, source: Target, record: DrillRecord) -> DrillRecord:
        """MariaDB: a scratch database on the drill server; SQLite: a scratch file, integrity_check first."""
        if entry.manifest.engine_name == "sqlite":
            from app.engines import sqlite_restore

            record.server = "a scratch file"
            sqlite_restore.drill(entry, source, record)
            return record
        from app.engines import mysql_restore

        if self.settings.db.engine != "mariadb":
            record.error = f"{entry.id} is a MariaDB backup, but this sidecar's server is {self.settings.db.engine}"
            return record
        globals_entry = None
        if not same_server(self.server, self.settings.db):
            good = [e for e in load_catalog(self.targets, "_globals").good() if e.manifest.engine_name == "mariadb"]
            globals_entry = good[0] if good else None
        mysql_restore.drill(self.server, self.settings.db, entry, source, record, globals_entry, self.targets)
        return record

    def _restore_and_compare(self, record: DrillRecord, source: Target, entry: Entry, name: str, t0: float) -> None:
        m = entry.manifest_on(source.name)
        full = bool(self._superuser)
        try:
            fits = m.format == "custom" and one_transaction_fits(self.server, m)[0]
            stream_into_database(self.server, source, m, name, options=Options(owner=full, acl=full), atomic=fits)
            with pg.connect(self.server, name) as conn:
                actual = contents.record(conn, exact=True)
        except (SidecarError, psycopg.Error) as exc:
            reason = mask(pg.first_line(exc))
            record.error = f"restore from {source.name} into {name} on {self.where()} failed: {reason}"
            hint = getattr(exc, "hint", None)
            if hint:
                record.error += f" (hint: {mask(hint)})"
            return
        record.rto_s = round(time.monotonic() - t0, 2)
        if m.contents:
            record.problems, record.compared = contents.compare(m.contents, actual)
        else:
            rows = sum(v for v in actual["rows"].values() if v)
            record.compared = (f"{len(actual['rows'])} tables, {rows} rows restored (the backup predates recorded "
                               "contents: nothing to compare with)")
        if not full and m.format == "custom":
            record.compared += (f"; owners and grants left out ({self.server.user} is not a superuser on the drill "
                                "server: set DRILL_DATABASE_URL)")
        record.status = "failed" if record.problems else "ok"
        if record.problems:
            record.error = f"from {source.name}: what came back differs from what was dumped: " + \
                           "; ".join(record.problems[:5])


def _finish(record: DrillRecord) -> DrillRecord:
    record.finished_at = utc_iso(datetime.now(UTC))
    return record


def store(targets: Sequence[Target], entry: Entry, record: DrillRecord) -> list[str]:
    """Write the record beside the backup's manifest on every target holding it; the errors, for the report."""
    key = layout.drill_key(entry.id, datetime.now(UTC))
    errors = []
    for target in targets:
        if target.name not in entry.manifest_keys:
            continue
        try:
            stored = record.for_encrypted_copy() if entry.encrypted_on(target.name) else record
            target.put_bytes(key, stored.to_json())
        except (TargetError, OSError) as exc:
            errors.append(f"the drill record could not be written to {target.name}: {mask(str(exc))}")
            log.error("%s", errors[-1])
    return errors


# --- DRILL_SCHEDULE ----------------------------------------------------------------------------------------


#: Called after each scheduled drill (`run` refreshes /health's cache, so the new record shows at once).
after_drill: list[Callable[[], object]] = []
BUSY_RETRY_S = 60.0


def drill_latest(settings: Settings, notifier: Notifier | None = None) -> list[DrillRecord]:
    """The scheduled drill: the latest ok backup of every database, each restored, compared and recorded.

    Under the readers' lock, like a restore: prune cannot delete a backup being drilled, and backups go on
    beside it (a drill must never cost a scheduled backup). Raises LockBusy while a prune runs."""
    targets = make_targets(settings)
    records = []
    with run_lock(settings, "drill"):
        catalog = load_catalog(targets)
        newest: dict[str, Entry] = {}
        for e in catalog.good():
            if e.manifest.kind == "database" and e.manifest.format in ("custom", "plain", "sqlite"):
                newest.setdefault(e.manifest.database, e)
        drill = Drill(settings, targets)
        for entry in newest.values():
            record = drill.run(entry, pick_source(entry, targets, None))
            store(targets, entry, record)
            records.append(record)
            log.info("drill of %s: %s: %s", entry.id, record.status, record.detail())
            if notifier is not None and not record.ok:
                notifier.failure("restore_test", entry.manifest.database, f"drill: {record.detail()}",
                                 backup_id=entry.id)
    return records


def attach(settings: Settings, notifier: Notifier | None) -> threading.Event:
    """Start the DRILL_SCHEDULE thread of `run` (nothing when unset); set the event to stop it."""
    stop = threading.Event()
    if settings.drill.schedule:
        threading.Thread(target=_scheduled, args=(settings, notifier, stop), name="drills", daemon=True).start()
    return stop


def _scheduled(settings: Settings, notifier: Notifier | None, stop: threading.Event) -> None:
    from app.schedule_spec import parse_schedule

    schedule = parse_schedule(settings.drill.schedule or "", settings.schedule.tz)
    while not stop.is_set():
        due = schedule.next_run(datetime.now(UTC))
        if stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
            return
        try:
            for _ in range(30):  # a prune holds the lock: try again a minute later, up to half an hour
                try:
                    drill_latest(settings, notifier)
                    break
                except LockBusy as busy:
                    log.info("drill postponed: %s", busy)
                    if stop.wait(BUSY_RETRY_S):
                        return
            for listener in after_drill:
                listener()
        except SidecarError as exc:
            log.error("the scheduled drill could not run: %s", exc)
            if notifier is not None:
                notifier.failure("restore_test", None, f"drill: {exc}")
        except Exception:
            log.exception("the scheduled drill failed unexpectedly")
        stop.wait(1)
