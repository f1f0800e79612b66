"""One backup per scheduled slot across hosts that share no volume (Kubernetes replicas, several servers).

The database being backed up is the coordinator every replica can reach: a session-level advisory lock,
taken with ``pg_try_advisory_lock`` on a connection named after the host, says "a dump of this database is
running", and the server drops it when that connection ends, however its process ended. Whoever gets the
lock then looks at the targets for an ok manifest of the same database and slot: a replica that comes a
moment after the winner finished finds the backup already made and skips. A failed manifest does not count,
so another replica retries a slot that failed on one host.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from app import pg
from app.catalog import load_catalog
from app.errors import SidecarError
from app.identity import ClusterId, source_identity
from app.leases import AdvisoryLease, MonitoredLease
from app.schedule_spec import Schedule
from app.settings import Settings
from app.targets.base import Target

log = logging.getLogger(__name__)

_HOLDER_SQL = """
SELECT a.application_name, a.backend_start, host(a.client_addr)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
"""


class SlotTaken(SidecarError):
    """This run must not dump: another host is dumping (``kind`` claim) or already did (``kind`` slot)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def slot_of(at: datetime) -> str:
    """A slot names a scheduled fire time: UTC, truncated to the minute, e.g. ``2026-11-22T03:00Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def scheduled_slot(schedule: Schedule, now: datetime, tolerance_s: float) -> str:
    """The slot of a scheduled one-shot run (`backup --scheduled`, a CronJob): the BACKUP_SCHEDULE fire time
    within ``tolerance_s`` of this host's clock, so that hosts whose clocks disagree by up to the tolerance
    name the same slot; the current minute when no fire time is that close (or the schedule is not aligned).
    """
    if schedule.aligned:
        window_end = now + timedelta(seconds=tolerance_s)
        fire, nearest = schedule.next_run(now - timedelta(seconds=tolerance_s + 1)), None
        while fire <= window_end:  # the nearest one: a tolerance wider than half the interval stays unambiguous
            if nearest is None or abs((fire - now).total_seconds()) < abs((nearest - now).total_seconds()):
                nearest = fire
            fire = schedule.next_run(fire)
        if nearest is not None:
            return slot_of(nearest)
        log.warning("no BACKUP_SCHEDULE time (%s) within CLOCK_SKEW_TOLERANCE of %s; using the current minute "
                    "as the slot (hint: run the CronJob on the same schedule as BACKUP_SCHEDULE)",
                    schedule.describe(), now.strftime("%H:%M:%SZ"))
    return slot_of(now)


def lock_key(dbname: str) -> int:
    """The advisory lock key: stable across hosts and versions, a signed 64-bit integer."""
    digest = hashlib.sha256(f"backup-sidecar:{dbname}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def app_name(hostname: str) -> str:
    """application_name of the claim connection; other replicas read the host back from it."""
    return f"backup-sidecar@{hostname}"[:63]


def _holder(conn: psycopg.Connection, key: int) -> str:
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    try:
        row = conn.execute(_HOLDER_SQL, (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
    except psycopg.Error as exc:
        log.debug("cannot read the lock holder: %s", exc)
        row = None
    if not row:
        return "another host"
    name, since, addr = row
    host = name.split("@", 1)[1] if name and "@" in name else (name or addr or "another host")
    when = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if since else "?"
    return f"{host} since {when}"


def find_slot_backup(targets: Sequence[Target], dbname: str, slot: str, cluster: ClusterId | None = None) -> str | None:
    """The ok backup of ``dbname`` made for ``slot`` by this cluster, as "ID by HOST"; None when there is none.

    A backup of another cluster (same database name and schedule, shared bucket) never counts for this one.
    """
    catalog = load_catalog(targets, dbname)
    for entry in catalog.good(dbname, cluster):
        if entry.manifest.slot == slot:
            return f"{entry.id} by {entry.manifest.host or '?'}"
    if catalog.errors:
        log.warning(
            "%s: could not read %s while looking for slot %s; backing up anyway",
            dbname,
            ", ".join(sorted(catalog.errors)),
            slot,
        )
    return None


@dataclass
class Claim:
    """What a claimed slot comes with: the advisory lease (None when the database could not be reached for it)
    and the source's identity as manifest fields (empty then)."""

    lease: MonitoredLease | None = None
    identity: dict[str, Any] = field(default_factory=dict)


@contextmanager
def claim(
    settings: Settings,
    targets: Sequence[Target],
    dbname: str,
    slot: str | None,
    force: bool = False,
    lock_db: str | None = None,
    engine: str = "postgresql",
) -> Iterator[Claim]:
    """Hold this artifact's slot for the block as a lease, or raise SlotTaken saying who has it or made it.

    ``dbname`` names the artifact (a database, ``_globals``, the files archive); the advisory lock is held
    in ``lock_db`` (default: ``dbname`` itself). ``slot`` None (a manual run) or ``force`` skips the search
    for a backup already made for the slot, never the lock. When that database cannot be reached for the
    lock, the run goes ahead without it: the dump will fail the same way and leave a failed manifest that
    /health and notifications see, instead of a silent skip.

    ``engine`` is the unit's: MariaDB claims with a named lock (``GET_LOCK``) on a session of its own; a SQLite
    file has no server to claim on, so only LOCK_FILE (on the volume that holds the files) serialises it.
    """
    if engine != "postgresql":
        with _claim_elsewhere(settings, targets, dbname, slot, force, engine) as held:
            yield held
        return
    key = lock_key(dbname)
    conn: psycopg.Connection | None = None
    held = Claim()
    try:
        conn = pg.connect(settings.db, lock_db or dbname, app_name=app_name(settings.hostname))
    except SidecarError as exc:
        log.debug("%s: no advisory lock, the database cannot be reached (the dump reports why): %s", dbname, exc)
    try:
        if conn is not None:
            held.identity = source_identity(conn, settings.db)
            held.lease = AdvisoryLease.acquire(conn, key, dbname)
            if held.lease is None:
                raise SlotTaken("claim", f"{dbname}: already running on {_holder(conn, key)}, skipping")
        if slot and not force:
            _skip_if_made(targets, dbname, slot, held.identity)
        yield held
    finally:
        if held.lease is not None:
            held.lease.release()
        elif conn is not None:
            conn.close()  # ends the session, which releases the advisory lock


def _skip_if_made(targets: Sequence[Target], dbname: str, slot: str, identity: dict[str, Any]) -> None:
    """SlotTaken when this cluster already has an ok backup of ``dbname`` for ``slot``."""
    cluster = ClusterId(identity.get("system_identifier"), identity.get("source")) if identity else None
    done = find_slot_backup(targets, dbname, slot, cluster)
    if done:
        raise SlotTaken("slot", f"{dbname}: slot {slot} already backed up as {done}, skipping")


@contextmanager
def _claim_elsewhere(settings: Settings, targets: Sequence[Target], dbname: str, slot: str | None, force: bool,
                     engine: str) -> Iterator[Claim]:
    """The claim of a MariaDB artifact (GET_LOCK) or of a SQLite file (none: LOCK_FILE only)."""
    held = Claim()
    if engine == "mariadb":
        from app.engines import mysql

        try:
            held.lease, held.identity, holder = mysql.claim_lease(settings.db, dbname, app_name(settings.hostname))
        except SidecarError as exc:
            log.debug("%s: no named lock, the server cannot be reached (the dump reports why): %s", dbname, exc)
        else:
            if held.lease is None:
                raise SlotTaken("claim", f"{dbname}: already running on {holder}, skipping")
    try:
        if slot and not force:
            _skip_if_made(targets, dbname, slot, held.identity)
        yield held
    finally:
        if held.lease is not None:
            held.lease.release()
