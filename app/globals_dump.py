"""Roles and tablespaces (``pg_dumpall --globals-only``): what a per-database dump leaves out, and what a
disaster recovery on a new server needs first. Role passwords stay out unless the operator opts in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

from app import pg
from app.backup import Artifact, child_source
from app.cancel import CancelToken
from app.databases import GLOBALS_NAME
from app.proc import Child
from app.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)


def globals_artifact(settings: Settings, cancel: CancelToken) -> Artifact:
    """The Artifact for the cluster's globals, stored as plain SQL under ``_globals/``."""
    db = settings.db
    maintenance_db = "postgres"
    warnings: list[str] = []
    with_passwords = settings.dump.globals_passwords

    def preflight() -> dict[str, str | None]:
        nonlocal with_passwords
        with pg.connect(db, maintenance_db) as conn:
            versions = pg.check_versions(db, maintenance_db, conn, binary="pg_dumpall")
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if with_passwords and not (row and row[0]):
            message = (f"role passwords left out of the globals: {db.user} is not a superuser, and only a "
                       "superuser can read them (hint: back up as a superuser, or set BACKUP_GLOBALS_PASSWORDS=false)")
            log.warning("%s", message)
            warnings.append(message)
            with_passwords = False
        return {"engine": "postgresql", "pg_dump_version": versions.client, "server_version": versions.server}

    def open_source() -> AbstractContextManager[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        argv = ["pg_dumpall", "--no-password", "--globals-only", f"--database={maintenance_db}"]
        if not with_passwords:
            argv.append("--no-role-passwords")
        return child_source(Child(argv, pg.child_env(db), timeout_s=settings.dump.timeout_s, cancel=cancel,
                                  explain=lambda line: pg.explain(line, db, maintenance_db)), warnings)

    return Artifact(GLOBALS_NAME, "globals", "plain", open_source, preflight)


# --- the way back: globals into a server --------------------------------------------------------------------

_CREATE_ROLE = re.compile(rb"^CREATE ROLE (.+);$")
_CREATE_TABLESPACE = re.compile(rb'^CREATE TABLESPACE ("(?:[^"]|"")+"|\S+) ')


def tolerant_globals(chunks: Iterable[bytes], tablespaces: set[str]) -> Iterator[bytes]:
    """pg_dumpall's globals SQL, made to apply to a server that already has some of it.

    A new cluster always has its bootstrap superuser (and a drill server may have more roles): each
    ``CREATE ROLE x;`` becomes a block that keeps an existing role, so the ``ALTER ROLE x WITH ...`` after it
    still sets its attributes and the later grants run. ``CREATE TABLESPACE`` (which cannot run in a block)
    is left out for tablespaces the server already has."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield b"".join(_tolerant_line(line, tablespaces) + b"\n" for line in lines)
    if rest:
        yield _tolerant_line(rest, tablespaces)


def _tolerant_line(line: bytes, tablespaces: set[str]) -> bytes:
    m = _CREATE_ROLE.match(line)
    if m:
        return (b"DO $bs_role$BEGIN CREATE ROLE " + m.group(1) + b"; EXCEPTION WHEN duplicate_object THEN "
                b"RAISE NOTICE 'role % exists already: kept, its attributes set below', "
                + _literal(m.group(1)) + b"; END$bs_role$;")
    m = _CREATE_TABLESPACE.match(line)
    if m:
        name = m.group(1).decode("utf-8", "replace")
        if name.startswith('"'):
            name = name[1:-1].replace('""', '"')
        if name in tablespaces:
            return b"-- tablespace " + m.group(1) + b" exists already: kept"
    return line


def _literal(raw: bytes) -> bytes:
    return b"'" + raw.replace(b"'", b"''") + b"'"


def apply_globals(db: DatabaseSettings, chunks: Iterable[bytes]) -> list[str]:
    """Roles, memberships, role settings and tablespaces into the server ``db`` points at (needs a superuser
    there); raises ChildFailed with psql's error (and PostgreSQL's HINT) on the first statement that fails."""
    from app.restore import leave_out_unknown_settings

    with pg.connect(db, "postgres") as conn:
        tablespaces = {str(r[0]) for r in conn.execute("SELECT spcname FROM pg_tablespace").fetchall()}
        known = frozenset(str(r[0]) for r in conn.execute("SELECT name FROM pg_settings").fetchall())
    argv = ["psql", "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1", "--file=-",
            "--dbname=postgres"]
    with Child(argv, pg.child_env(db), feeds=True, explain=lambda line: pg.explain(line, db, "postgres")) as feed:
        for chunk in leave_out_unknown_settings(tolerant_globals(chunks, tablespaces), known):
            feed.write(chunk)
        return feed.finish()
