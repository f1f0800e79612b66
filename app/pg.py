"""Talking to PostgreSQL: the child environment for pg_dump/psql, a psycopg connection, version checks.

The password travels only as PGPASSWORD in a child's environment, built from scratch here so that no
other secret of the sidecar's own environment (DATABASE_URL, S3 keys, ...) is inherited by pg_dump.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass

import psycopg

from app.errors import SidecarError
from app.proc import run_short, scratch_env
from app.settings import DatabaseSettings

#: Variables of the sidecar's environment that children may inherit (no secrets among them).
_INHERIT = ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGOPTIONS", "PGTZ", "PGCLIENTENCODING")

APP_NAME = "backup-sidecar"


class PgError(SidecarError):
    """A database-side failure, as one masked line with a hint."""


@dataclass(frozen=True)
class Versions:
    client: str
    client_major: int
    server: str
    server_major: int


def child_env(db: DatabaseSettings, app_name: str = APP_NAME) -> dict[str, str]:
    """Environment for pg_dump/pg_restore/psql: connection as PG* variables, password only as PGPASSWORD."""
    env = scratch_env(*_INHERIT)
    env.update(dict(db.libpq_env))
    env.update(
        PGHOST=db.host,
        PGPORT=str(db.port),
        PGUSER=db.user,
        PGCONNECT_TIMEOUT=str(db.connect_timeout),
        PGAPPNAME=app_name,
    )
    if db.password:
        env["PGPASSWORD"] = db.password
    return env


def connect(db: DatabaseSettings, dbname: str, app_name: str = APP_NAME, autocommit: bool = True) -> psycopg.Connection:
    """A psycopg connection with the same parameters pg_dump gets; errors become PgError with a hint."""
    params: dict[str, str | int] = {k: v for k, v in (
        (_LIBPQ_KEYWORD.get(var, ""), value) for var, value in db.libpq_env
    ) if k}
    params.update(host=db.host, port=db.port, user=db.user, dbname=dbname,
                  connect_timeout=db.connect_timeout, application_name=app_name)
    if db.password:
        params["password"] = db.password
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        raise PgError(explain(exc, db, dbname)) from exc


_LIBPQ_KEYWORD = {
    "PGHOSTADDR": "hostaddr", "PGSSLMODE": "sslmode", "PGSSLROOTCERT": "sslrootcert", "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey", "PGTARGETSESSIONATTRS": "target_session_attrs", "PGOPTIONS": "options",
}


def explain(exc: BaseException | str, db: DatabaseSettings, dbname: str) -> str:
    """One line for a libpq/pg_dump failure, with the hint an operator needs at 3 a.m."""
    text = str(exc).strip()
    first = first_line(exc)  # the server's own words, without libpq's preamble
    where = f"{db.user}@{db.host}:{db.port}/{dbname}"
    low = text.lower()
    hint = next((h for alternatives, h in _HINTS if any(all(w in low for w in words) for words in alternatives)),
                "see the PostgreSQL server's log for details")
    hint = hint.format(user=db.user)
    return f"{where}: {first} (hint: {hint})"


#: (alternatives, hint): the first rule one of whose alternatives (all words in it, lower case) occurs in the
#: error decides the hint; {user} is the connecting role. Order matters: the specific before the general.
_HINTS: tuple[tuple[tuple[tuple[str, ...], ...], str], ...] = (
    ((("password authentication failed",), ("no password supplied",)),
     "check POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE and POSTGRES_USER"),
    ((("does not exist", "database", "fatal"),), "check POSTGRES_DB: the database is missing on that server"),
    ((("role", "does not exist", "fatal"),), "check POSTGRES_USER: the role is missing on that server"),
    ((("role", "does not exist"),),
     "a role the backup refers to is missing on this server: restore the globals first (restore-cluster applies "
     "them), or pass --no-owner/--no-acl"),
    ((("does not exist", "database"),), "check POSTGRES_DB: the database is missing on that server"),
    ((("connection refused",), ("could not connect", "refused")),
     "check POSTGRES_HOST and POSTGRES_PORT, and that the server is up and listening"),
    ((("could not translate host name",), ("name or service not known",)),
     "check POSTGRES_HOST: the name does not resolve"),
    ((("unrecognized configuration parameter",),),
     "the client is newer than the server and set a parameter the server does not know (version skew, not "
     "damage): use a postgresql-client of the server's major version"),
    ((("timeout expired",), ("timed out",)),
     "the server did not answer in time: check the network path and POSTGRES_CONNECT_TIMEOUT"),
    ((("row-level security",),),
     "tables with row-level security need BYPASSRLS to be dumped whole: ALTER ROLE {user} BYPASSRLS; "
     "(run as a superuser)"),
    ((("permission denied for large object",),),
     "pg_read_all_data does not cover large objects: run as a superuser `ALTER SYSTEM SET lo_compat_privileges "
     "= on; SELECT pg_reload_conf();`, or grant SELECT ON LARGE OBJECT to {user} (see the runbook's roles "
     "section)"),
    ((("must be member of role",), ("must be owner of",), ("must be able to set role",)),
     "the restoring role must be a member of every role that owns objects in the backup (or a superuser): "
     "restore the globals first and GRANT those roles to it, or pass --no-owner"),
    ((("permission denied to create extension",), ("must be superuser to create",)),
     "this extension needs a superuser: create it beforehand as a superuser in the target database, restore as "
     "a superuser, or use a drill server (DRILL_DATABASE_URL) where the sidecar is one"),
    ((("out of shared memory",), ("max_locks_per_transaction",)),
     "one transaction ran out of lock slots: raise max_locks_per_transaction on this server (needs a restart)"),
    ((("unsupported version", "file header"),),
     "the archive was written by a newer pg_dump than this pg_restore reads (version skew, not damage): use an "
     "image with a newer postgresql-client"),
    ((("permission denied",),), "the backup role lacks rights: grant it read access (e.g. pg_read_all_data)"),
    ((("no pg_hba.conf entry",),), "allow the sidecar's address in the server's pg_hba.conf"),
    ((("server version mismatch",),),
     "use an image whose pg_dump is at least the server's major version (PG_MAJOR build argument)"),
)

#: libpq/pg_dump wrapping around the server's message: "pg_dump: error: connection to server at "h" (1.2.3.4),
#: port 5432 failed: FATAL:  password authentication failed ..." keeps only the part after FATAL.
_NOISE = re.compile(
    r'(?:pg_(?:dump(?:all)?|restore): error: |connection failed: '
    r'|connection to server (?:at|on) .*?(?:port \d+ )?failed: '
    r'|(?:FATAL|ERROR):\s+)'
)


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an error, without libpq's preamble."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return _NOISE.sub("", first).strip() or first or exc.__class__.__name__


def said(exc: BaseException) -> str:
    """A psycopg error as one line with the server's DETAIL, the way ServerSaid does it for a child's stderr."""
    detail = getattr(getattr(exc, "diag", None), "message_detail", None)
    return first_line(exc) + (f"; DETAIL: {detail}" if detail else "")


def hint_with_server(exc: BaseException, ours: str) -> str:
    """PostgreSQL's own HINT (when it gave one) before ours."""
    server = getattr(getattr(exc, "diag", None), "message_hint", None)
    return f"PostgreSQL says: {server} {ours}" if server else ours


def client_version(binary: str = "pg_dump") -> tuple[str, int]:
    """Version of a client binary, e.g. ("15.20", 15); PgError with a hint when it is missing."""
    return _client_version(binary, os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=32)
def _client_version(binary: str, _path: str) -> tuple[str, int]:
    """Asked once per binary and PATH: restore-cluster would otherwise run ``--version`` twice a database."""
    try:
        done = run_short([binary, "--version"], timeout=30, env=scratch_env(*_INHERIT))
        done.check_returncode()
        out = done.stdout
    except FileNotFoundError as exc:
        raise PgError(f"{binary} is not installed or not on PATH (hint: install postgresql-client)") from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise PgError(f"{binary} --version failed: {exc} (hint: check the postgresql-client install)") from exc
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not m:
        raise PgError(f"cannot read the version of {binary} from {out.strip()!r} (hint: check postgresql-client)")
    return m.group(0), int(m.group(1))


#: Where Debian (and the PGDG packages) install each major's clients side by side.
CLIENT_DIRS = ("/usr/lib/postgresql/{major}/bin",)


def client_for(binary: str, server_major: int, archive_major: int = 0) -> str:
    """The client to run against a server of ``server_major``: the one on PATH unless it is newer than the
    server, in which case an installed client of the server's major (or the nearest newer one that still
    reads the archive) is used: a newer pg_restore sends settings an older server rejects (pg_restore 17's
    ``SET transaction_timeout``). Falls back to PATH's, whose error the restore then reports as skew."""
    try:
        _, path_major = client_version(binary)
    except PgError:
        return binary
    if path_major <= server_major:
        return binary
    for major in range(max(server_major, archive_major), path_major):
        for pattern in CLIENT_DIRS:
            candidate = os.path.join(pattern.format(major=major), binary)
            if os.access(candidate, os.X_OK):
                return candidate
    return binary


def server_version(conn: psycopg.Connection) -> tuple[str, int]:
    num = conn.info.server_version  # e.g. 150020 or 90624
    major = num // 10000 if num >= 100000 else num // 100
    raw = conn.execute("SHOW server_version").fetchone()
    return (str(raw[0]).split()[0] if raw else str(num)), major


def check_versions(db: DatabaseSettings, dbname: str, conn: psycopg.Connection, binary: str = "pg_dump") -> Versions:
    """Refuse early, with what to do, when pg_dump is older than the server (it would refuse mid-run)."""
    client, client_major = client_version(binary)
    server, server_major = server_version(conn)
    if server_major > client_major:
        raise PgError(
            f"{db.host}:{db.port}/{dbname}: server is PostgreSQL {server} but {binary} is {client}; {binary} cannot "
            f"dump a newer server (hint: use an image with postgresql-client {server_major} or newer, e.g. build "
            f"with --build-arg PG_MAJOR={server_major})"
        )
    return Versions(client, client_major, server, server_major)


def list_databases(conn: psycopg.Connection) -> list[str]:
    """Connectable, non-template databases, for POSTGRES_DB=*."""
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
    ).fetchall()
    return [r[0] for r in rows]
