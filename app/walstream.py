"""WAL_ARCHIVE=true in `run`: pg_receivewal supervised on a physical slot, the shipper, the slot monitor, and
base backups (at start when none exists, then on BASE_BACKUP_SCHEDULE).

Why a slot and a spool: the slot makes the server keep every WAL file until pg_receivewal has it, so a
restart of the sidecar or a network cut loses nothing; the spool (WAL_SPOOL_DIR, on a volume) keeps every
file until every target holds a checked copy, so an outage of a target loses nothing either. The price is
the server's disk while the sidecar is away, which is why /health watches the slot's retained bytes.

Threads: the receiver (starts pg_receivewal, restarts it with backoff 1 s doubling to 60 s), a shipper per
target (a pass every second for completed files, the partial segment every WAL_PARTIAL_INTERVAL), the slot monitor
(every few seconds), and one base backup at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import psycopg
import schedule

from app import pg
from app.backup import BackupFailed
from app.basebackup import base_backup, cluster_facts, maintenance_db
from app.cancel import Cancelled, CancelToken
from app.catalog import load_catalog
from app.errors import SidecarError
from app.logs import mask
from app.manifest import Manifest
from app.proc import Child
from app.schedule_spec import parse_schedule
from app.settings import Settings
from app.targets.base import Target
from app.walship import Shipper, spool_ready
from app.walstatus import SlotReading, WalStatus

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 60.0
STREAMING_AFTER_S = 1.0  # a pg_receivewal alive this long has connected (auth and slot errors end it sooner)

_SLOT_SQL = """
SELECT restart_lsn IS NOT NULL, wal_status, active,
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END,
                       restart_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s AND slot_type = 'physical'
"""


def ensure_slot(settings: Settings) -> dict[str, object]:
    """Create the physical slot when it is missing (reserving WAL at once); return the cluster's facts."""
    db, slot = settings.db, settings.wal.slot
    with pg.connect(db, maintenance_db(settings)) as conn:
        row = conn.execute("SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user").fetchone()
        if not row or not row[0]:
            raise SidecarError(f"{db.user}@{db.host}:{db.port}: the role {db.user} lacks REPLICATION, so it cannot "
                               "stream WAL", hint=f"ALTER ROLE {db.user} REPLICATION; and a pg_hba.conf line: host "
                               f"replication {db.user} <sidecar address> scram-sha-256")
        exists = conn.execute("SELECT slot_type FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        if exists and exists[0] != "physical":
            raise SidecarError(f"the replication slot {slot} exists but is {exists[0]}",
                               hint="set WAL_SLOT to another name")
        if not exists:
            try:
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            except psycopg.errors.DuplicateObject:
                pass  # another replica created it meanwhile
            except psycopg.Error as exc:
                raise SidecarError(f"cannot create the replication slot {slot}: {str(exc).strip().splitlines()[0]}",
                                   hint="raise max_replication_slots on the server, or free a slot") from exc
            log.info("created the physical replication slot %s on %s:%s", slot, db.host, db.port)
        return cluster_facts(conn)


def read_slot(settings: Settings) -> SlotReading:
    now = datetime.now(UTC)
    try:
        with pg.connect(settings.db, maintenance_db(settings)) as conn:
            row = conn.execute(_SLOT_SQL, (settings.wal.slot,)).fetchone()
    except (SidecarError, psycopg.Error) as exc:
        return SlotReading(now, False, error=mask(str(exc)).splitlines()[0])
    if row is None:
        return SlotReading(now, False)
    return SlotReading(now, True, int(row[3]) if row[3] is not None else None, row[1], bool(row[2]))


class WalArchiver:
    """The WAL side of `run`; ``start`` after the web server, ``stop`` within the runtime's stop budget."""

    def __init__(self, settings: Settings, targets: Sequence[Target], *, slot_every_s: float = 5.0,
                 ship_every_s: float = 1.0, on_base: Callable[[Manifest], object] | None = None) -> None:
        self.settings = settings
        self.targets = list(targets)
        self.status = WalStatus(settings.wal.slot)
        self.facts: dict[str, object] = {}
        self.shipper = Shipper(settings, self.targets, self.status,
                               lambda: str(self.facts["system_identifier"]) if self.facts else None)
        self.slot_every_s = slot_every_s
        self.ship_every_s = ship_every_s
        self.on_base = on_base
        self._stop = threading.Event()
        self._receiver_cancel = CancelToken()
        self._base_cancel = CancelToken()
        self._threads: list[threading.Thread] = []
        self._base: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        spool_ready(self.settings.wal.spool)
        loops: list[tuple[Callable[..., None], tuple[object, ...], str]] = [
            (self._receive, (), "wal-receiver"), (self._watch_slot, (), "wal-slot"),
            (self._first_base, (), "wal-first-base")]
        loops += [(self._ship, (t,), f"wal-shipper-{t.name}") for t in self.targets]  # one per target: independent
        for run, args, name in loops:
            t = threading.Thread(target=run, args=args, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("WAL archive on: slot %s, spool %s, partial segment every %ss", self.settings.wal.slot,
                 self.settings.wal.spool, int(self.settings.wal.partial_interval_s))

    def install(self, scheduler: schedule.Scheduler) -> None:
        """BASE_BACKUP_SCHEDULE on the runtime's scheduler (its loop calls ``base_due`` on time)."""
        parse_schedule(self.settings.wal.base_schedule, self.settings.schedule.tz).install(scheduler, self.base_due)

    def stop(self, budget_s: float) -> None:
        """Stop streaming, then ship the partial segment one last time so the recovery point is the stop."""
        deadline = time.monotonic() + budget_s
        self._stop.set()
        self._base_cancel.cancel("the sidecar is stopping")
        self._receiver_cancel.cancel("the sidecar is stopping")
        for t in self._threads[:1]:
            t.join(max(0.0, min(4.0, deadline - time.monotonic())))
        final = threading.Thread(target=self._final_pass, name="wal-final", daemon=True)
        final.start()
        final.join(max(0.0, deadline - time.monotonic() - (1.0 if self._base else 0.0)))
        if self._base is not None:
            self._base.join(max(0.0, deadline - time.monotonic()))
        log.info("WAL archive stopped; %d file(s) wait in the spool", self.status.pending)

    def _final_pass(self) -> None:
        try:
            self.shipper.pass_once(partial=True)
        except Exception:
            log.exception("the last WAL shipping pass failed")

    # --- threads ------------------------------------------------------------------------------------------
    def _receive(self) -> None:
        delay = 1.0
        self.status.slot = read_slot(self.settings)  # first: what the slot kept while the sidecar was away
        while not self._stop.is_set():
            started = time.monotonic()
            error = self._stream_once()
            if self._stop.is_set():
                break
            delay = 1.0 if time.monotonic() - started > BACKOFF_MAX_S else min(delay * 2, BACKOFF_MAX_S)
            self.status.receiver(False, error, restarted=True)
            log.warning("WAL streaming stopped: %s; retrying in %.0fs", error, delay)
            self._stop.wait(delay)
        self.status.receiver(False, "stopped")

    def _stream_once(self) -> str:
        try:
            self.facts = ensure_slot(self.settings)
        except SidecarError as exc:
            return mask(str(exc)).splitlines()[0]
        db = self.settings.db
        argv = ["pg_receivewal", "--no-password", f"--directory={self.settings.wal.spool}",
                f"--slot={self.settings.wal.slot}", "--no-loop", "--status-interval=1"]
        child = Child(argv, pg.child_env(db), cancel=self._receiver_cancel, die_with_parent=True, term_grace_s=3.0,
                      explain=lambda line: pg.explain(line, db, "replication"))
        try:
            with child:
                if not self._stop.wait(STREAMING_AFTER_S) and child.proc is not None and child.proc.poll() is None:
                    self.status.receiver(True)
                    log.info("pg_receivewal streams into %s on slot %s", self.settings.wal.spool,
                             self.settings.wal.slot)
                child.finish()
                return "pg_receivewal exited"
        except Cancelled:
            return "stopped"
        except SidecarError as exc:
            return mask(str(exc)).splitlines()[0]

    def _ship(self, target: Target) -> None:
        last_partial = time.monotonic()
        while not self._stop.wait(self.ship_every_s):
            partial = time.monotonic() - last_partial >= self.settings.wal.partial_interval_s
            try:
                self.shipper.target_pass(target, partial=partial)
            except Exception:
                log.exception("WAL shipping pass to %s failed", target.name)
            if partial:
                last_partial = time.monotonic()

    def _watch_slot(self) -> None:
        while not self._stop.wait(self.slot_every_s):
            self.status.slot = read_slot(self.settings)

    def _first_base(self) -> None:
        """One base backup at start when the targets hold none, once the WAL from its start is streaming."""
        while not self.status.receiver_streaming:
            if self._stop.wait(0.5):
                return
        try:
            catalog = load_catalog(self.targets, "_base")
        except Exception as exc:  # noqa: BLE001 - a reading fault must not kill the thread; the schedule retries
            log.error("cannot look for base backups: %s", exc)
            return
        if catalog.errors:
            log.warning("not starting a base backup: a target could not be read (%s)",
                        "; ".join(catalog.errors.values()))
            return
        if not [e for e in catalog.good() if e.manifest.kind == "base"]:
            log.info("no base backup on the targets yet: taking one now")
            self.base_due()

    # --- base backups -------------------------------------------------------------------------------------
    def base_due(self) -> bool:
        """Start a base backup unless one is running; False when skipped."""
        if self._base is not None and self._base.is_alive():
            log.warning("base backup skipped: the one started at %s is still running",
                        self.status.base_running_since)
            return False
        self._base = threading.Thread(target=self._base_job, name="base-backup", daemon=True)
        self._base.start()
        return True

    def _base_job(self) -> None:
        self.status.base_running_since = datetime.now(UTC).replace(microsecond=0)
        manifest: Manifest | None = None
        try:
            manifest = base_backup(self.settings, self.targets, self._base_cancel)
            self.status.base_error = None
        except BackupFailed as exc:
            manifest = exc.manifest
            self.status.base_error = exc.manifest.error
        except Exception as exc:  # noqa: BLE001 - reported as the base backup's failure
            log.exception("base backup crashed")
            self.status.base_error = f"{exc.__class__.__name__}: {mask(str(exc))}".splitlines()[0]
        finally:
            self.status.base_running_since = None
        if manifest is not None and self.on_base is not None:
            self.on_base(manifest)
