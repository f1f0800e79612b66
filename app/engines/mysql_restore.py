"""`restore` of a MariaDB backup: staged in a scratch database, then swapped in by one RENAME TABLE.

MariaDB's DDL commits implicitly, so the script cannot run in one transaction. Instead it goes, through the
stock ``mariadb`` client, into a fresh ``bs_staging_…`` database the application never sees; only when it
is complete does one multi-table ``RENAME TABLE`` (atomic: all of it or none) move the live tables into a
``bs_retired_…`` database and the restored ones into their place.

What RENAME TABLE cannot move across databases (checked on MariaDB 10.11): views (error 1450) and tables
that have triggers (error 1435); routines and events belong to their database. So views and triggers are
read from the staging database (``SHOW CREATE``, in its own context, so no staging name leaks into them),
dropped there, and created in the target after the swap, with routines and events, each under the
sql_mode it was defined with. If any of that fails, the RENAME is reversed and the target's own views,
routines and events are put back: the database is then as it was. A target that has tables and triggers,
or a backup with triggers over a target with tables, is refused: its triggers could not stay in force
across the swap. Bodies that name the source database explicitly keep naming it; the result says so.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pymysql

from app.catalog import Entry
from app.engines import mysql
from app.engines.mysql import MysqlError, quote
from app.errors import SidecarError
from app.logs import mask
from app.manifest import Manifest
from app.readpath import Progress, archive_chunks
from app.selection import pick_source
from app.settings import DatabaseSettings, Settings
from app.targets import Target

log = logging.getLogger(__name__)
STAGING_PREFIX, RETIRED_PREFIX = "bs_staging_", "bs_retired_"


@dataclass
class Definitions:
    """A database's objects RENAME TABLE does not carry, as the statements that recreate them."""

    views: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (sql_mode, CREATE VIEW)
    triggers: dict[str, tuple[str, str]] = field(default_factory=dict)
    routines: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (type, name) -> ...
    events: dict[str, tuple[str, str]] = field(default_factory=dict)

    def mentions(self, dbname: str) -> list[str]:
        """Objects whose body names ``dbname`` explicitly (they keep pointing at it after a restore elsewhere)."""
        pattern = re.compile(rf"(?:`{re.escape(dbname.replace('`', '``'))}`|\b{re.escape(dbname)}\b)\s*\.")
        found = []
        for kind, items in (("view", self.views), ("trigger", self.triggers), ("event", self.events)):
            found += [f"{kind} {name}" for name, (_, sql) in items.items() if pattern.search(sql)]
        found += [f"{kind.lower()} {name}" for (kind, name), (_, sql) in self.routines.items() if pattern.search(sql)]
        return found


def _names(cur: Any, dbname: str, table_type: str) -> list[str]:
    cur.execute("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_TYPE=%s "
                "ORDER BY TABLE_NAME", (dbname, table_type))
    return [str(r[0]) for r in cur.fetchall()]


def definitions(db: DatabaseSettings, dbname: str) -> Definitions:
    """Views, triggers, routines and events of ``dbname`` as recreatable statements, read in its own context."""
    out = Definitions()
    with mysql.connect(db, dbname) as conn, conn.cursor() as cur:
        for name in _names(cur, dbname, "VIEW"):
            cur.execute(f"SHOW CREATE VIEW {quote(name)}")
            out.views[name] = ("", _or_replace(str(cur.fetchone()[1]), "VIEW"))
        cur.execute("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA=%s "
                    "ORDER BY ACTION_ORDER", (dbname,))
        for (name,) in cur.fetchall():
            cur.execute(f"SHOW CREATE TRIGGER {quote(str(name))}")
            row = cur.fetchone()
            out.triggers[str(name)] = (str(row[1]), str(row[2]))
        cur.execute("SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA=%s",
                    (dbname,))
        for kind, name in cur.fetchall():
            cur.execute(f"SHOW CREATE {kind} {quote(str(name))}")
            row = cur.fetchone()
            out.routines[(str(kind), str(name))] = (str(row[1]), _or_replace(str(row[2]), str(kind)))
        cur.execute("SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA=%s", (dbname,))
        for (name,) in cur.fetchall():
            cur.execute(f"SHOW CREATE EVENT {quote(str(name))}")
            row = cur.fetchone()
            out.events[str(name)] = (str(row[1]), _or_replace(str(row[3]), "EVENT"))
    return out


def _or_replace(sql: str, kind: str) -> str:
    """``CREATE [ALGORITHM=..] [DEFINER=..] VIEW`` -> ``CREATE OR REPLACE ...``: replaces in one statement."""
    return re.sub(r"^CREATE\s+(?!OR REPLACE)", "CREATE OR REPLACE ", sql, count=1) if kind != "TRIGGER" else sql


def _apply(cur: Any, statements: Sequence[tuple[str, str]]) -> None:
    """Run each (sql_mode, statement) in order; views that depend on views not made yet are retried."""
    pending = list(statements)
    while pending:
        failed: list[tuple[str, str]] = []
        last: Exception | None = None
        for mode, sql in pending:
            try:
                cur.execute("SET SESSION sql_mode = %s", (mode,))
                cur.execute(sql)
            except pymysql.err.MySQLError as exc:
                failed.append((mode, sql))
                last = exc
        if len(failed) == len(pending):
            assert last is not None
            raise MysqlError(f"cannot recreate {failed[0][1][:120]!r}: {last.args[-1] if last.args else last}",
                             hint="the restoring user needs the rights to create it (SET USER for another "
                                  "DEFINER, or SUPER)")
        pending = failed


def _statements(defs: Definitions, *, with_triggers: bool = True) -> list[tuple[str, str]]:
    out = [(mode, sql) for mode, sql in defs.routines.values()]
    out += [("", sql) for _, sql in defs.views.values()]
    if with_triggers:
        out += list(defs.triggers.values())
    return out + list(defs.events.values())


def _rename(cur: Any, moves: Sequence[tuple[str, str, str, str]]) -> None:
    """One RENAME TABLE statement for every (from_db, table, to_db, table): atomic."""
    if moves:
        cur.execute("RENAME TABLE " + ", ".join(f"{quote(a)}.{quote(t)} TO {quote(b)}.{quote(u)}"
                                                for a, t, b, u in moves))


@dataclass(frozen=True)
class Swapped:
    how: str
    notes: list[str]


def swap_in(db: DatabaseSettings, staging: str, target: str, source_db: str) -> Swapped:
    """Move the complete staging database's contents into ``target`` (which exists), replacing its own."""
    new = definitions(db, staging)
    old = definitions(db, target)
    notes = [f"{what} names the source database {source_db} explicitly and still points there"
             for what in new.mentions(source_db)] if source_db != target else []
    retired = (RETIRED_PREFIX + secrets.token_hex(4) + "_" + target)[:64]
    with mysql.connect(db, target) as conn, conn.cursor() as cur:
        live = _names(cur, target, "BASE TABLE") + _names(cur, target, "SEQUENCE")
        incoming = _names(cur, staging, "BASE TABLE") + _names(cur, staging, "SEQUENCE")
        if live and (old.triggers or new.triggers):
            raise MysqlError(f"{target} has tables, and {'it' if old.triggers else 'the backup'} has triggers, "
                             "which RENAME TABLE cannot move between databases: the swap would not be atomic",
                             hint="restore into a new database (--to-db NEW --create) and switch the application "
                                  "to it, or drop the triggers first")
        if live:
            cur.execute(f"CREATE DATABASE {quote(retired)}")
        for name in new.triggers:
            cur.execute(f"DROP TRIGGER {quote(staging)}.{quote(name)}")
        for name in new.views:
            cur.execute(f"DROP VIEW {quote(staging)}.{quote(name)}")
        forward = [(target, t, retired, t) for t in live] + [(staging, t, target, t) for t in incoming]
        _rename(cur, forward)
        try:
            for name in old.views:
                if name not in new.views:
                    cur.execute(f"DROP VIEW IF EXISTS {quote(name)}")
            for kind, name in old.routines:
                if (kind, name) not in new.routines:
                    cur.execute(f"DROP {kind} IF EXISTS {quote(name)}")
            for name in old.events:
                if name not in new.events:
                    cur.execute(f"DROP EVENT IF EXISTS {quote(name)}")
            _apply(cur, _statements(new))
        except BaseException as exc:
            _swap_back(cur, forward, new, old, exc)
        if live:
            cur.execute(f"DROP DATABASE {quote(retired)}")
    return Swapped("staged in " + staging + ", then swapped in by one RENAME TABLE", notes)


def _swap_back(cur: Any, forward: Sequence[tuple[str, str, str, str]], new: Definitions, old: Definitions,
               exc: BaseException) -> NoReturn:
    """Undo a swap whose views/routines/events could not be created: the target as it was, or say what is not."""
    try:
        for name in new.triggers:
            cur.execute(f"DROP TRIGGER IF EXISTS {quote(name)}")
        for name in new.views:
            if name not in old.views:
                cur.execute(f"DROP VIEW IF EXISTS {quote(name)}")
        for kind, name in new.routines:
            if (kind, name) not in old.routines:
                cur.execute(f"DROP {kind} IF EXISTS {quote(name)}")
        for name in new.events:
            if name not in old.events:
                cur.execute(f"DROP EVENT IF EXISTS {quote(name)}")
        _rename(cur, [(b, u, a, t) for a, t, b, u in forward])
        _apply(cur, _statements(old, with_triggers=False))
    except Exception as undo:  # noqa: BLE001 - reported with the original failure
        raise MysqlError(f"{exc}; undoing the swap failed too ({undo}): the target may be incomplete",
                         hint="compare it with the backup, and restore again") from exc
    raise exc


# --- the command ------------------------------------------------------------------------------------------------


def consume(db: DatabaseSettings, target: Target, manifest: Manifest, dbname: str,
            progress: Progress | None = None) -> list[str]:
    """The backup's SQL into ``dbname`` through the stock client; the script's end arrives only once its
    SHA-256 matched (app/readpath.py), and any error stops it (the client's default without --force)."""
    args = ["--batch", "--default-character-set=utf8mb4", "--max-allowed-packet=1G",
            f"--connect-timeout={db.connect_timeout}"]
    with mysql.client(db, mysql.client_binary(), args, database=dbname, feeds=True, term_grace_s=5.0) as feed:
        for chunk in archive_chunks(target, manifest, progress):
            feed.write(chunk)
        return feed.finish()


def table_count(db: DatabaseSettings, dbname: str) -> int:
    with mysql.connect(db) as conn, conn.cursor() as cur:
        return len(_names(cur, dbname, "BASE TABLE"))


def restore_mariadb(settings: Settings, targets: Sequence[Target], entry: Entry, to_db: str, *, create: bool,
                    clean: bool, yes: bool, source: str | None, confirm: Callable[[str], bool] | None,
                    progress: bool) -> Any:
    """Restore a MariaDB backup into ``to_db``: fully, or not at all (the staging database is dropped)."""
    from app.restore import RestoreResult, confirm_restore, fail_restore

    db = settings.db
    manifest = entry.manifest
    if db.engine != "mariadb":
        raise SidecarError(f"{entry.id} is a MariaDB backup, but this sidecar's server is {db.engine}",
                           hint="point MYSQL_HOST/MYSQL_PORT (or a mysql:// URL) at a MariaDB server")
    if manifest.kind != "database" or manifest.format != "plain":
        raise SidecarError(f"{entry.id} is a {manifest.kind} archive, not a database dump",
                           hint="apply users and grants with `zstd -dc FILE | mariadb`")
    if len(to_db) > 64 - len(STAGING_PREFIX) - 9:
        raise SidecarError(f"database name {to_db!r} is too long for a staged restore",
                           hint=f"use a name of at most {64 - len(STAGING_PREFIX) - 9} characters")
    target = pick_source(entry, targets, source)
    manifest = entry.manifest_on(target.name)
    where = mysql.where(db, to_db)
    exists = mysql.database_exists(db, to_db)
    for left in mysql.databases_like(db, STAGING_PREFIX) + mysql.databases_like(db, RETIRED_PREFIX):
        log.warning("database %s is left over from an interrupted restore (drop it when no restore runs)", left)
    tables = table_count(db, to_db) if exists else 0
    if not exists and not create:
        raise SidecarError(f"database {to_db} does not exist on {db.host}:{db.port}", hint="add --create to create it")
    if tables and not clean:
        raise SidecarError(f"database {where} is not empty ({tables} tables)",
                           hint="restore into a new database with --create, or add --clean to replace it")
    if tables and (manifest.contents or {}).get("objects", {}).get("triggers"):
        raise SidecarError(f"{entry.id} has triggers, and {to_db} has tables: RENAME TABLE cannot move tables with "
                           "triggers between databases, so the swap would not be atomic",
                           hint="restore into a new database (--to-db NEW --create) and switch the application to "
                                "it, or drop the database first")
    if not yes:
        confirm_restore(entry, target, str(where), tables, exists, confirm)
    staging = (STAGING_PREFIX + secrets.token_hex(4) + "_" + to_db)[:64]
    log.info("restore %s from %s into %s started (staged in %s)", entry.id, target.describe(), where, staging)
    meter = Progress(f"restore {entry.id}", manifest.size_bytes) if progress else None
    t0 = time.monotonic()
    untouched = f"{to_db} was not touched" if exists else f"{to_db} was not created"
    mysql.create_database(db, staging, manifest.database_properties)
    try:
        for line in consume(db, target, manifest, staging, meter):
            log.warning("%s", line)
        if not exists:
            mysql.create_database(db, to_db, manifest.database_properties)
        try:
            swapped = swap_in(db, staging, to_db, manifest.database)
        except BaseException:
            if not exists:
                _quietly(lambda: mysql.drop_database(db, to_db))
            raise
    except BaseException as exc:
        dropped = _quietly(lambda: mysql.drop_database(db, staging))
        state = f"{untouched}; the staging database {staging} " + ("was dropped" if dropped else "could NOT be dropped")
        fail_restore(exc, manifest, to_db, state)
    _quietly(lambda: mysql.drop_database(db, staging))
    if meter is not None:
        meter.finish()
    seconds = time.monotonic() - t0
    result = RestoreResult(entry.id, target.name, to_db, manifest.size_bytes, seconds, not exists,
                           table_count(db, to_db), swapped.how, notes=swapped.notes)
    log.info("restore %s into %s done in %.1fs", entry.id, where, seconds)
    return result


def _quietly(action: Callable[[], object]) -> bool:
    try:
        action()
    except SidecarError as exc:
        log.error("%s", exc)
        return False
    return True


# --- drills ----------------------------------------------------------------------------------------------------


def drill(server: DatabaseSettings, source_db: DatabaseSettings, entry: Entry, target: Target,
          record: Any, globals_entry: Entry | None, targets: Sequence[Target]) -> None:
    """Restore into a scratch database on the drill server, compare with the manifest, always drop it.

    Fills ``record`` (app/drills.py DrillRecord); on a drill server other than the source, the latest users
    and grants are applied first, so DEFINERs exist."""
    from app import contents
    from app.drills import SCRATCH_PREFIX, same_server

    m = entry.manifest_on(target.name)
    if not same_server(server, source_db) and globals_entry is not None:
        try:
            apply_globals(server, globals_entry, pick_source(globals_entry, targets, None))
        except SidecarError as exc:
            record.error = f"the users and grants could not be applied to the drill server: {mask(str(exc))}"
            return
    name = SCRATCH_PREFIX + secrets.token_hex(4)
    t0 = time.monotonic()
    try:
        mysql.create_database(server, name, m.database_properties)
    except SidecarError as exc:
        record.error = f"cannot create the scratch database on {server.host}:{server.port}: {mask(str(exc))}"
        return
    try:
        consume(server, target, m, name)
        actual = mysql.recorded_contents(server, name)
        record.rto_s = round(time.monotonic() - t0, 2)
        if m.contents:
            record.problems, record.compared = contents.compare(m.contents, actual)
        else:
            record.compared = f"{len(actual['rows'])} tables restored (no recorded contents to compare with)"
        record.status = "failed" if record.problems else "ok"
        if record.problems:
            record.error = (f"from {target.name}: what came back differs from what was dumped: "
                            + "; ".join(record.problems[:5]))
    except SidecarError as exc:
        record.error = f"restore from {target.name} into {name} on {server.host}:{server.port} failed: {mask(str(exc))}"
    finally:
        try:
            mysql.drop_database(server, name)
        except SidecarError as exc:
            record.status = "failed"
            record.error = f"{record.error or record.compared}; scratch database {name} could NOT be dropped: {exc}"


def apply_globals(server: DatabaseSettings, entry: Entry, target: Target) -> list[str]:
    """Users and grants of a globals backup into ``server`` (CREATE USER IF NOT EXISTS keeps existing ones)."""
    with mysql.client(server, mysql.client_binary(), ["--batch", "--default-character-set=utf8mb4"],
                      feeds=True) as feed:
        for chunk in archive_chunks(target, entry.manifest_on(target.name)):
            feed.write(chunk)
        return feed.finish()
