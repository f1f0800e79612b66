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
from datetime import UTC, datetime

import psycopg

from app import pg
from app.catalog import load_catalog
from app.errors import SidecarError
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


def find_slot_backup(targets: Sequence[Target], dbname: str, slot: str) -> str | None:
    """The ok backup of ``dbname`` made for ``slot``, as "ID by HOST"; None when there is none yet."""
    catalog = load_catalog(targets, dbname)
    for entry in catalog.good(dbname):
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


@contextmanager
def claim(
    settings: Settings,
    targets: Sequence[Target],
    dbname: str,
    slot: str | None,
    force: bool = False,
    lock_db: str | None = None,
) -> Iterator[None]:
    """Hold this database's slot for the block, or raise SlotTaken saying who has it or made it.

    ``dbname`` names the artifact (a database, ``_globals``, the files archive); the advisory lock is held
    in ``lock_db`` (default: ``dbname`` itself). When that database cannot be reached for the lock, the run
    goes ahead without it: the dump will fail the same way and leave a failed manifest that /health and
    notifications see, instead of a silent skip.
    """
    key = lock_key(dbname)
    conn: psycopg.Connection | None = None
    try:
        conn = pg.connect(settings.db, lock_db or dbname, app_name=app_name(settings.hostname))
    except SidecarError as exc:
        log.warning("%s: cannot take the database lock, going ahead without it: %s", dbname, exc)
    try:
        if conn is not None:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (row and row[0]):
                raise SlotTaken("claim", f"{dbname}: already running on {_holder(conn, key)}, skipping")
        if slot and not force:
            done = find_slot_backup(targets, dbname, slot)
            if done:
                raise SlotTaken("slot", f"{dbname}: slot {slot} already backed up as {done}, skipping")
        yield
    finally:
        if conn is not None:
            conn.close()  # ends the session, which releases the advisory lock
