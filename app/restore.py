"""`restore`: stream a backup out of a target, through decompression, into pg_restore or psql.

The outcome is all or nothing, and what the sidecar says about it is what happened:

- **In place, one transaction** (custom format that fits in one transaction): ``pg_restore
  --single-transaction``, with the archive's last bytes held back until the SHA-256 matched (app/readpath.py),
  so a damaged artifact, an error or a kill rolls back and the database is as it was.
- **Staged, then swapped** (plain SQL, whose large-object section commits on its own, and archives needing
  more locks than one transaction can take): the backup goes into a fresh staging database, and only once it
  is complete does one transaction rename the live database away and the staging one into its place. A
  failure drops the staging database; a kill leaves it behind under its ``bs_staging_`` name. The live
  database is never touched until the swap.

``--create`` gives a new database the source's properties (recorded in the manifest at backup time);
``--no-owner``/``--no-acl`` leave owners and grants out, and the result lists what was left out.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NoReturn

from app import dbadmin, pg
from app.catalog import Entry
from app.dbadmin import DatabaseProperties
from app.durations import format_size
from app.errors import SidecarError
from app.locks import LockBusy, run_lock
from app.logs import mask
from app.manifest import Manifest, utc_iso
from app.proc import Child
from app.readpath import Progress, archive_chunks
from app.selection import pick_source, resolve_entry
from app.settings import DatabaseSettings, Settings
from app.targets import Target, make_targets

log = logging.getLogger(__name__)
STAGING_PREFIX = "bs_staging_"


class RestoreFailed(SidecarError):
    """A restore that did not complete; the message says what state the database was left in."""


@dataclass(frozen=True)
class Options:
    """How a backup is applied: ``clean`` lets it replace existing objects; ``owner``/``acl`` False leave owners
    and grants out (pg_restore --no-owner/--no-privileges)."""

    clean: bool = False
    owner: bool = True
    acl: bool = True

    def consumer_flags(self) -> list[str]:
        return (["--no-owner"] if not self.owner else []) + (["--no-privileges"] if not self.acl else [])

    def dropped(self, user: str) -> list[str]:
        out = []
        if not self.owner:
            out.append(f"object owners (--no-owner: everything belongs to {user})")
        if not self.acl:
            out.append("grants and revokes on objects (--no-acl)")
        return out


# --- feeding a consumer process -------------------------------------------------------------------------


def conninfo_dbname(dbname: str) -> str:
    """``dbname='...'`` for --dbname: a name with '=' or a URL prefix is then never read as a connection string."""
    escaped = dbname.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


def consumer_argv(manifest: Manifest, dbname: str, options: Options, *, atomic: bool,
                  pg_restore: str = "pg_restore") -> list[str]:
    """The command that applies the archive to ``dbname``, stopping at the first error."""
    target = f"--dbname={conninfo_dbname(dbname)}"
    if manifest.format == "custom":
        argv = [pg_restore, "--no-password", "--exit-on-error", target, *options.consumer_flags()]
        if atomic:
            argv.append("--single-transaction")
        return argv + (["--clean", "--if-exists"] if options.clean else [])
    if manifest.format == "plain":
        return ["psql", "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--file=-", target]
    raise RestoreFailed(f"cannot restore a {manifest.format!r} archive into a database",
                        hint="it is not a pg_dump backup")


def stream_into_database(db: DatabaseSettings, target: Target, manifest: Manifest, dbname: str, *,
                         options: Options = Options(), atomic: bool = True,
                         progress: Progress | None = None) -> list[str]:
    """Apply the backup to ``dbname``; raise on any fault. With ``atomic`` (custom format only) it is one
    transaction whose COMMIT cannot come before the checksum matched. Returns the consumer's warnings."""
    server_major, known = _server_facts(db, dbname)
    binary = pg.client_for("pg_restore", server_major, _major(manifest.pg_dump_version))
    if manifest.format == "custom" and binary == "pg_restore" and pg.client_version(binary)[1] > server_major:
        return _through_psql(db, target, manifest, dbname, options, atomic, progress, known, server_major)
    if binary != "pg_restore":
        log.info("pg_restore on PATH is newer than the server (PostgreSQL %d): using %s", server_major, binary)
    argv = consumer_argv(manifest, dbname, options, atomic=atomic, pg_restore=binary)
    chunks = archive_chunks(target, manifest, progress)
    if manifest.format == "plain":  # pg_dump 17 writes `SET transaction_timeout = 0;` even for a 15 server
        chunks = leave_out_unknown_settings(chunks, known)
    with Child(argv, pg.child_env(db), feeds=True, term_grace_s=5.0, name=argv[0].rsplit("/", 1)[-1],
               explain=lambda line: pg.explain(line, db, dbname)) as feed:
        for chunk in chunks:
            feed.write(chunk)
        return feed.finish()


def _through_psql(db: DatabaseSettings, target: Target, manifest: Manifest, dbname: str, options: Options,
                  atomic: bool, progress: Progress | None, known: frozenset[str], server_major: int) -> list[str]:
    """Version skew with no client of the server's major installed: ``pg_restore --file=-`` turns the archive
    into SQL, the session settings this server does not know (pg_restore 17's ``SET transaction_timeout``)
    are left out, and psql applies the rest. ``--single-transaction`` puts BEGIN/COMMIT into the script, and
    pg_restore cannot write the COMMIT before it read the held-back tail, so atomicity is unchanged."""
    log.info("pg_restore is newer than the server (PostgreSQL %d) and no matching client is installed: restoring "
             "through psql, leaving out settings the server does not know", server_major)
    flags = ["--single-transaction"] if atomic else []
    flags += ["--clean", "--if-exists"] if options.clean else []
    to_sql = Child(["pg_restore", "--file=-", *options.consumer_flags(), *flags], pg.child_env(db), feeds=True,
                   passes=True, term_grace_s=5.0)
    apply = Child(consumer_argv(replace(manifest, format="plain"), dbname, options, atomic=False),
                  pg.child_env(db), feeds=True, term_grace_s=5.0, explain=lambda line: pg.explain(line, db, dbname))
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            for chunk in archive_chunks(target, manifest, progress):
                to_sql.write(chunk)
            to_sql.end_input()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
            to_sql.kill("stopped because the archive could not be read")

    with to_sql, apply:
        feeder = threading.Thread(target=pump, name="pg_restore-feed", daemon=True)
        feeder.start()
        for chunk in leave_out_unknown_settings(to_sql.chunks(), known):
            apply.write(chunk)
        feeder.join()
        if failure:
            raise failure[0]
        to_sql.finish()
        return apply.finish()


_SET = re.compile(rb"^SET ([a-z_][a-z0-9_.]*) = .*;$")


def leave_out_unknown_settings(chunks: Iterable[bytes], known: frozenset[str]) -> Iterator[bytes]:
    """pg_dump's or pg_restore's SQL without ``SET name = ...;`` lines for settings the server lacks (never
    inside COPY data): a newer client's session settings, which an older server rejects."""
    rest = b""
    in_copy = False
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        out = []
        for line in lines:
            if in_copy:
                in_copy = line != b"\\."
            elif line.startswith(b"COPY ") and line.endswith(b"FROM stdin;"):
                in_copy = True
            else:
                m = _SET.match(line)
                if m and m.group(1).decode() not in known:
                    log.info("left out for this server: %s", line.decode(errors="replace"))
                    continue
            out.append(line + b"\n")
        yield b"".join(out)
    if rest:
        yield rest


def _server_facts(db: DatabaseSettings, dbname: str) -> tuple[int, frozenset[str]]:
    """The server's major version and the names of the settings it knows."""
    with pg.connect(db, dbname) as conn:
        names = frozenset(str(r[0]) for r in conn.execute("SELECT name FROM pg_settings").fetchall())
        return pg.server_version(conn)[1], names


def _major(version: str | None) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def one_transaction_fits(db: DatabaseSettings, manifest: Manifest) -> tuple[bool, int, int]:
    """Whether ``pg_restore --single-transaction`` of this backup fits in the server's lock table.

    It takes about four locks per table (table, TOAST, indexes, constraints) and one or two per other
    relation and large object, all held to COMMIT; the lock table holds max_locks_per_transaction x
    (max_connections + max_prepared_transactions), shared with every other session, so half of it is the
    budget. Backups without recorded contents are assumed to fit (PostgreSQL's HINT says otherwise)."""
    objects = (manifest.contents or {}).get("objects") or {}
    needed = (4 * (objects.get("tables", 0) + objects.get("partitioned_tables", 0)) + objects.get("indexes", 0)
              + objects.get("sequences", 0) + objects.get("views", 0) + objects.get("materialized_views", 0)
              + 2 * objects.get("large_objects", 0))
    capacity = dbadmin.lock_capacity(db)
    return needed <= capacity // 2, needed, capacity


# --- the command -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    source: str
    database: str
    size_bytes: int
    seconds: float
    created: bool
    tables: int
    how: str  # "in place, one transaction" | "staged in X, swapped in"
    dropped: list[str] = field(default_factory=list)  # what was left out (--no-owner, --no-acl, old manifest)
    notes: list[str] = field(default_factory=list)  # what the operator should know (an engine's caveats)


def ask_on_terminal(question: str) -> bool:
    """Ask on the terminal; only an explicit ``yes`` goes ahead."""
    print(question, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        return False
    return answer.strip().lower() == "yes"


def confirm_restore(entry: Entry, target: Target, where: str, tables: int, exists: bool,
                    confirm: Callable[[str], bool] | None) -> None:
    """Ask before a restore (every engine); refuse when nobody can answer, or the answer is not yes."""
    if not sys.stdin.isatty() and confirm is None:
        raise SidecarError("restore needs confirmation but stdin is not a terminal", hint="add --yes")
    what = (f"replacing the database and its {tables} tables" if tables
            else ("creating it" if not exists else ""))
    question = (f"Restore {entry.id} ({format_size(entry.manifest_on(target.name).size_bytes)}, finished "
                f"{utc_iso(entry.manifest.finished_at) or '?'}) from {target.name} into {where}"
                f"{', ' + what if what else ''}? Type yes to go ahead: ")
    if not (confirm or ask_on_terminal)(question):
        raise SidecarError("restore cancelled: not confirmed", hint="answer yes, or pass --yes")


def staging_name(to_db: str) -> str:
    """``bs_staging_<hex>_<target>``, cut to PostgreSQL's 63 bytes."""
    name = f"{STAGING_PREFIX}{secrets.token_hex(4)}_{to_db}"
    return name.encode()[:63].decode(errors="ignore")


def restore(settings: Settings, targets: Sequence[Target], ref: str, to_db: str, *, database: str | None = None,
            create: bool = False, clean: bool = False, yes: bool = False, source: str | None = None,
            owner: bool = True, acl: bool = True, confirm: Callable[[str], bool] | None = None,
            progress: bool = True, entry: Entry | None = None, force: bool = False) -> RestoreResult:
    """Restore ``ref`` into ``to_db``; the database is either fully restored or left as it was (or dropped, if
    this call created it), and every other outcome raises with what happened. MariaDB and SQLite backups go
    their own way (app/engines/mysql_restore.py, app/engines/sqlite_restore.py) with the same promise."""
    db = settings.db
    entry = entry or resolve_entry(targets, ref, database, source)
    manifest = entry.manifest
    if manifest.engine_name != "postgresql" and not (owner and acl):
        raise SidecarError("--no-owner/--no-acl are for PostgreSQL custom archives",
                           hint=f"{entry.id} is a {manifest.engine_name} backup: drop them")
    if manifest.engine_name == "mariadb":
        from app.engines.mysql_restore import restore_mariadb

        return restore_mariadb(settings, targets, entry, to_db, create=create, clean=clean, yes=yes, source=source,
                               confirm=confirm, progress=progress)
    if manifest.engine_name == "sqlite":
        from app.engines.sqlite_restore import restore_sqlite

        return restore_sqlite(settings, targets, entry, to_db, create=create, clean=clean, yes=yes, force=force,
                              source=source, confirm=confirm, progress=progress)
    if db.engine != "postgresql":
        raise SidecarError(f"{entry.id} is a PostgreSQL backup, but this sidecar's server is {db.engine}",
                           hint="point POSTGRES_* (or a postgresql:// URL) at a PostgreSQL server")
    if manifest.kind != "database" or manifest.format not in ("custom", "plain"):
        raise SidecarError(f"{entry.id} is a {manifest.kind} archive, not a database dump",
                           hint="use restore-cluster for globals, restore-files for files archives")
    options = Options(clean=clean, owner=owner, acl=acl)
    if manifest.format == "plain" and not (owner and acl):
        raise SidecarError(f"{entry.id} is plain SQL: its owners and grants are statements in the script and cannot "
                           "be left out", hint="restore as a role that is a member of the owners (or a superuser), "
                                               "or switch to BACKUP_FORMAT=custom for --no-owner/--no-acl")
    target = pick_source(entry, targets, source)
    manifest = entry.manifest_on(target.name)
    where = f"{db.host}:{db.port}/{to_db}"
    exists = dbadmin.database_exists(db, to_db)
    for left in dbadmin.databases_like(db, STAGING_PREFIX):
        log.warning("database %s is left over from an interrupted restore (drop it when no restore runs)", left)
    tables = 0
    if not exists and not create:
        raise SidecarError(f"database {to_db} does not exist on {db.host}:{db.port}", hint="add --create to create it")
    if exists:
        tables = dbadmin.user_table_count(db, to_db)
        if tables and not clean:
            raise SidecarError(f"database {where} is not empty ({tables} tables)",
                               hint="restore into a new database with --create, or add --clean to replace it")
    staged = manifest.format == "plain"
    if not staged:
        fits, needed, capacity = one_transaction_fits(db, manifest)
        if not fits:
            log.info("%s needs about %d locks in one transaction, the server has %d: staged restore",
                     entry.id, needed, capacity)
            staged = True
    if not yes:
        confirm_restore(entry, target, where, tables, exists, confirm)
    dropped = options.dropped(db.user)
    props = _properties_for(db, to_db, exists, manifest, dropped)
    log.info("restore %s from %s into %s started (%s)", entry.id, target.describe(), where,
             "staged" if staged else "one transaction")
    meter = Progress(f"restore {entry.id}", manifest.size_bytes) if progress else None
    t0 = time.monotonic()
    if staged:
        how = _staged(db, target, manifest, to_db, exists, props, options, meter, dropped)
    else:
        how = _in_place(db, target, manifest, to_db, exists, props, options, meter, dropped)
    seconds = time.monotonic() - t0
    if meter is not None:
        meter.finish()
    return RestoreResult(entry.id, target.name, to_db, manifest.size_bytes, seconds, not exists,
                         dbadmin.user_table_count(db, to_db), how, dropped)


def _properties_for(db: DatabaseSettings, to_db: str, exists: bool, manifest: Manifest,
                    dropped: list[str]) -> DatabaseProperties | None:
    """A new database gets the source's properties; a replaced one keeps its own."""
    if exists:
        with dbadmin.maintenance_connection(db) as conn:
            return dbadmin.properties(conn, to_db)
    props = DatabaseProperties.from_doc(manifest.database_properties)
    if props is None:
        dropped.append("the source database's properties (this backup predates their recording): created with "
                       "this server's defaults")
    return props


def _in_place(db: DatabaseSettings, target: Target, manifest: Manifest, to_db: str, exists: bool,
              props: DatabaseProperties | None, options: Options, meter: Progress | None, dropped: list[str]) -> str:
    if not exists:
        dropped += dbadmin.create_database(db, to_db, props, owner=options.owner, acl=options.acl).dropped
    try:
        _log_warnings(stream_into_database(db, target, manifest, to_db, options=options, progress=meter))
    except BaseException as exc:
        state = ("the transaction was rolled back and the database is as it was" if exists
                 else _drop_quietly(db, to_db, "the database created for it"))
        fail_restore(exc, manifest, to_db, state)
    return "in place, one transaction"


def _staged(db: DatabaseSettings, target: Target, manifest: Manifest, to_db: str, exists: bool,
            props: DatabaseProperties | None, options: Options, meter: Progress | None, dropped: list[str]) -> str:
    staging = staging_name(to_db)
    dropped += dbadmin.create_database(db, staging, props, owner=options.owner, acl=options.acl).dropped
    untouched = f"{to_db} was not touched" if exists else f"{to_db} was not created"

    def abandon(exc: BaseException) -> NoReturn:  # the staging database goes; the live one stays as it was
        dropped_state = _drop_quietly(db, staging, f"the staging database {staging}")
        fail_restore(exc, manifest, to_db, f"{untouched}; {dropped_state}")

    try:
        _log_warnings(stream_into_database(db, target, manifest, staging, options=Options(owner=options.owner,
                                           acl=options.acl), atomic=False, progress=meter))
    except BaseException as exc:
        abandon(exc)
    if exists:
        retired = staging.replace(STAGING_PREFIX, "bs_retired_", 1)
        try:
            dbadmin.swap_databases(db, to_db, staging, retired)
        except BaseException as exc:
            abandon(exc)
        try:
            dbadmin.drop_database(db, retired)
        except SidecarError as exc:
            log.error("the replaced database survives as %s: %s", retired, exc)
    else:
        try:
            dbadmin.rename_database(db, staging, to_db)
        except BaseException as exc:
            abandon(exc)
    return f"staged in {staging}, then swapped in"


def _drop_quietly(db: DatabaseSettings, dbname: str, what: str) -> str:
    try:
        dbadmin.drop_database(db, dbname)
    except SidecarError as exc:
        log.error("%s", exc)
        return f"{what} could NOT be dropped ({exc})"
    return f"{what} was dropped"


def fail_restore(exc: BaseException, manifest: Manifest, to_db: str, state: str) -> NoReturn:
    """Raise RestoreFailed for ``exc`` saying the ``state`` the destination was left in (every engine's restore);
    a KeyboardInterrupt or SystemExit is logged with that state and re-raised as it is."""
    if isinstance(exc, Exception):
        text = getattr(exc, "message", None) or str(exc)
        message = mask(text).splitlines()[0] if text else exc.__class__.__name__
        hint = getattr(exc, "hint", None)
        raise RestoreFailed(f"restore of {manifest.id} into {to_db} failed, {state}: {message}",
                            hint=mask(hint) if hint else None) from exc
    log.error("restore of %s into %s interrupted, %s", manifest.id, to_db, state)
    raise exc


def _log_warnings(lines: list[str]) -> None:
    for line in lines:
        log.warning("%s", line)


def restore_command(settings: Settings, ref: str, to_db: str, *, database: str | None, create: bool, clean: bool,
                    yes: bool, source: str | None, owner: bool = True, acl: bool = True, force: bool = False) -> None:
    """`backup-sidecar restore`: under the run lock, so prune cannot delete the backup while it streams."""
    all_targets = make_targets(settings)
    check_source(all_targets, source)
    configured = [d for d in settings.db.databases if d != "*"] + [n for n, _ in
                                                                  (settings.sqlite.files if settings.sqlite else ())]
    if database is None and ref == "latest" and len(configured) == 1:
        database = configured[0]  # `latest` of the one database this sidecar backs up
    with restore_lock(settings):
        result = restore(settings, all_targets, ref, to_db, database=database, create=create, clean=clean,
                         yes=yes, source=source, owner=owner, acl=acl, force=force)
    print(f"restored {result.backup_id} from {result.source} into {result.database}"
          f"{' (created)' if result.created else ''}: {result.tables} tables, {format_size(result.size_bytes)} "
          f"in {result.seconds:.1f}s ({result.how})")
    for what in result.dropped:
        print(f"  left out: {what}")
    for note in result.notes:
        print(f"  note: {note}")


def check_source(targets: Sequence[Target], source: str | None) -> None:
    if source is not None and source not in {t.name for t in targets}:
        var = "S3_BUCKET" if source == "s3" else "NAS_PATH"
        raise SidecarError(f"--from {source}: that target is not configured", hint=f"set {var}")


@contextmanager
def restore_lock(settings: Settings) -> Iterator[None]:
    """The run lock; a restore that finds it taken fails (exit 1) instead of skipping like a scheduled run."""
    try:
        with run_lock(settings, "restore"):
            yield
    except LockBusy as exc:
        who = exc.holder.describe() if exc.holder else "another process"
        raise SidecarError(f"cannot restore now: {who} holds the lock",
                           hint="wait until it finishes, or set LOCK_TIMEOUT to wait for it") from exc
