"""pg_dump of one database as an Artifact: the PostgreSQL dump the backup pipeline streams.

The preflight (connect, compare versions, and what the manifest records about the source) runs before any
upload starts, so a database that cannot be dumped fails before a byte is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg

from app import contents, databases, dbadmin, pg, privileges
from app.backup import Artifact, child_source, run_artifact
from app.cancel import CancelToken
from app.manifest import Manifest
from app.proc import Child
from app.settings import DatabaseSettings, Settings
from app.targets.base import Target


def dump_artifact(settings: Settings, dbname: str, cancel: CancelToken) -> Artifact:
    """The Artifact for ``pg_dump`` of one database (custom format uncompressed inside, or plain SQL)."""
    databases.check_name(dbname, settings)  # the one naming rule, before anything is written under the name
    db = settings.db
    env = pg.child_env(db)
    env["PGDATABASE"] = dbname  # the name goes by environment too: a name with '=' is never parsed as conninfo
    argv = ["pg_dump", "--no-password", f"--format={settings.dump.format}"]
    if settings.dump.format == "custom":
        argv.append("--compress=0")  # compressed once, in the stream, so stock zstd/gunzip can read it
    argv += list(db.extra_dump_opts)

    warnings: list[str] = []
    session: list[psycopg.Connection] = []  # the snapshot's transaction stays open until pg_dump has it

    def preflight() -> dict[str, object]:
        with pg.connect(db, dbname) as conn:
            versions = pg.check_versions(db, dbname, conn)
        fields: dict[str, object] = {"pg_dump_version": versions.client, "server_version": versions.server,
                                     "engine": "postgresql"}
        snapshot, found = source_facts(db, dbname, session)
        warnings.extend(found.pop("warnings"))
        fields.update(found)
        if snapshot:
            argv.append(f"--snapshot={snapshot}")
        return fields

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        try:
            with child_source(Child(argv, env, timeout_s=settings.dump.timeout_s, cancel=cancel,
                                    explain=lambda line: pg.explain(line, db, dbname)), warnings) as source:
                yield source
        finally:
            for conn in session:
                conn.close()

    return Artifact(dbname, "database", settings.dump.format, open_source, preflight,
                    size_estimate=lambda: database_size(settings, dbname))


def database_size(settings: Settings, dbname: str) -> int:
    """The database's on-disk size: an upper bound of its dump, which S3 plans its part size from."""
    with pg.connect(settings.db, dbname) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def source_facts(db: DatabaseSettings, dbname: str,
                 session: list[psycopg.Connection]) -> tuple[str | None, dict[str, object]]:
    """Before the dump: what the role cannot read (fails with the fixing SQL, or warnings), the database's
    properties, and its contents counted in a snapshot exported for pg_dump (``--snapshot``), so the counts
    describe exactly what is dumped. The connection holding the snapshot is appended to ``session``."""
    for conn in session:
        conn.close()
    session.clear()
    conn = pg.connect(db, dbname)  # autocommit: the transaction below is ours, with our isolation level
    session.append(conn)
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot: str | None = None
        try:
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            value = row[0] if row else None  # bytes on a SQL_ASCII database
            snapshot = value.decode() if isinstance(value, bytes) else (str(value) if value else None)
        except psycopg.Error:  # e.g. a server that cannot export snapshots: counts come from a moment earlier
            conn.execute("ROLLBACK")
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        warnings = privileges.check_backup(conn, dbname)
        props = dbadmin.properties(conn, dbname)
        # Counting waits for table locks like pg_dump does, but outside its watchdog: a table locked for
        # longer than this gets estimates (which take no table locks), and pg_dump then waits, bounded.
        conn.execute("SAVEPOINT bs_count; SET LOCAL lock_timeout = '2s'")
        try:
            counted = contents.record(conn)
            conn.execute("RELEASE SAVEPOINT bs_count")
        except psycopg.errors.LockNotAvailable:
            conn.execute("ROLLBACK TO SAVEPOINT bs_count")
            counted = contents.record(conn, exact=False)
        facts: dict[str, object] = {"warnings": warnings, "contents": counted,
                                    "database_properties": props.to_doc() if props else None}
    except BaseException:
        conn.close()
        session.clear()
        raise
    return snapshot, facts


def backup_database(settings: Settings, targets: Sequence[Target], dbname: str, cancel: CancelToken,
                    slot: str | None = None) -> Manifest:
    """pg_dump of ``dbname`` into every target; returns the ok manifest or raises BackupFailed."""
    return run_artifact(settings, targets, dump_artifact(settings, dbname, cancel), cancel, slot)
