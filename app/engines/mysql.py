"""MariaDB (and MySQL): connections, the dump as an Artifact, users and grants, the claim, the way back.

The password never reaches argv or an environment: every client (mariadb-dump, mariadb) gets its whole
connection as an option file on an inherited pipe, ``--defaults-file=/dev/fd/N``, read once by the client at
start and gone with the pipe. ``MYSQL_PWD`` would work for MariaDB's clients too, but MySQL 8 deprecated it,
and a variable stays readable in ``/proc/PID/environ`` for the child's whole life; the pipe holds it for
milliseconds. ``--defaults-file`` also means no option file of the image or host is read, so nothing but
the sidecar's settings decides where a client connects.

The dump (``--single-transaction``) is one consistent InnoDB snapshot; tables of other engines are named in
a warning. Rows are counted from the dump stream itself (app/engines/mysql_stream.py), so the manifest's
``contents`` describe exactly what was dumped; the binary log position comes from the same stream.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.err

from app.backup import Artifact, child_source
from app.cancel import CancelToken
from app.databases import GLOBALS_NAME, check_name
from app.engines.mysql_stream import DumpScanner, without_passwords
from app.errors import SidecarError
from app.leases import MonitoredLease
from app.proc import Child, run_short, scratch_env
from app.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)

#: Schemas of the server itself: never backed up as databases (users and grants are the globals artifact).
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
#: Engines whose tables --single-transaction dumps consistently.
TRANSACTIONAL = frozenset({"InnoDB", "Aria"})  # Aria with TRANSACTIONAL=1 only; see _non_transactional


class MysqlError(SidecarError):
    """A MariaDB/MySQL failure as one line with a hint."""


# --- connections -------------------------------------------------------------------------------------------


def where(db: DatabaseSettings, dbname: str | None = None) -> str:
    return f"{db.user}@{db.host}:{db.port}" + (f"/{dbname}" if dbname else "")


def connect(db: DatabaseSettings, dbname: str | None = None, *, timeout: int | None = None) -> pymysql.Connection:
    """A PyMySQL connection with the settings the clients get; failures become MysqlError with a hint."""
    params: dict[str, Any] = {"user": db.user, "password": db.password or "", "database": dbname,
                              "connect_timeout": timeout or db.connect_timeout, "charset": "utf8mb4",
                              "autocommit": True, "program_name": "backup-sidecar"}
    if db.host.startswith("/"):
        params["unix_socket"] = db.host
    else:
        params.update(host=db.host, port=db.port)
    try:
        return pymysql.connect(**params)
    except pymysql.err.MySQLError as exc:
        raise MysqlError(explain(str(exc.args[1]) if len(exc.args) > 1 else str(exc), db, dbname)) from exc
    except TypeError:  # PyMySQL without program_name
        params.pop("program_name")
        try:
            return pymysql.connect(**params)
        except pymysql.err.MySQLError as exc:
            raise MysqlError(explain(str(exc.args[1]) if len(exc.args) > 1 else str(exc), db, dbname)) from exc


#: (words that all occur in the error, lower case) -> hint; the first match decides. Specific before general.
_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("access denied", "using password"), "check MYSQL_PASSWORD / MYSQL_PASSWORD_FILE and MYSQL_USER"),
    (("access denied", "to database"),
     "the backup user lacks rights on that database: GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES ON *.* "
     "TO the backup user (see the README's MariaDB section)"),
    (("unknown database",), "check MYSQL_DATABASE: the database is missing on that server"),
    (("can't connect",), "check MYSQL_HOST and MYSQL_PORT, and that the server is up and listening"),
    (("unknown server host",), "check MYSQL_HOST: the name does not resolve"),
    (("lost connection",), "the server closed the connection: check its error log, max_allowed_packet and "
                           "net_read_timeout, and the network path"),
    (("command denied",), "the backup user lacks a privilege: GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES "
                          "ON *.* TO the backup user (see the README's MariaDB section)"),
    (("access denied", "privilege"), "the user lacks a privilege the operation needs (the message names it)"),
    (("unknown table 'column_statistics'",), "mysqldump 8 against a MariaDB server: use mariadb-dump"),
    (("unknown variable",), "the client does not know a setting the sidecar passes: use a newer client"),
)


def explain(text: str, db: DatabaseSettings, dbname: str | None) -> str:
    """One line for a client or server failure, with the hint an operator needs."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))
    first = re.sub(r"^(?:mariadb-dump|mysqldump|mariadb|mysql): (?:Got error: )?", "", first)
    low = first.lower()
    hint = next((h for words, h in _HINTS if all(w in low for w in words)), "see the server's error log")
    return f"{where(db, dbname)}: {first} (hint: {hint})"


def _option(value: str) -> str:
    """A value for a MariaDB option file: double-quoted, with the escapes the option-file reader undoes."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def option_pipe(db: DatabaseSettings, database: str | None = None) -> int:
    """The read end of a pipe holding the connection as a ``[client]`` option file (password included).

    A pipe's buffer (64 KiB) holds the few hundred bytes at once, so nothing ever waits on it; the read end is
    handed to the child (``--defaults-file=/dev/fd/N``) and closed here once it started."""
    lines = ["[client]", f"user={_option(db.user)}"]
    if db.host.startswith("/"):
        lines.append(f"socket={_option(db.host)}")
    else:
        lines += [f"host={_option(db.host)}", f"port={db.port}", "protocol=TCP"]
    if db.password:
        lines.append(f"password={_option(db.password)}")
    if database:
        lines.append(f"database={_option(database)}")
    read, write = os.pipe()
    try:
        os.write(write, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(write)
    return read


def child_env() -> dict[str, str]:
    """A scratch environment with no secret in it: the connection travels in the option-file pipe."""
    return scratch_env()


def client(db: DatabaseSettings, binary: str, args: Sequence[str], *, database: str | None = None,
           **kwargs: Any) -> Child:
    """A Child running a MariaDB/MySQL client against ``db``, its connection in an option-file pipe."""
    fd = option_pipe(db, database)
    return Child([binary, f"--defaults-file=/dev/fd/{fd}", *args], child_env(), pass_fds=(fd,),
                 explain=lambda line: explain(line, db, database), **kwargs)


# --- versions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    text: str  # as printed
    number: tuple[int, int, int]
    mariadb: bool

    @property
    def family(self) -> str:
        return "MariaDB" if self.mariadb else "MySQL"

    def short(self) -> str:
        return f"{self.family} {'.'.join(map(str, self.number))}"


_NUMBER = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> Version:
    m = _NUMBER.search(text.split("Distrib", 1)[-1])
    number = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)
    return Version(text.strip(), number, "mariadb" in text.lower())


def dump_binary() -> str:
    """mariadb-dump, else mysqldump (MariaDB's package ships both names; MySQL's only the latter)."""
    return shutil.which("mariadb-dump") or shutil.which("mysqldump") or "mariadb-dump"


def client_binary() -> str:
    return shutil.which("mariadb") or shutil.which("mysql") or "mariadb"


def client_version(binary: str) -> Version:
    try:
        done = run_short([binary, "--version"], timeout=30)
        done.check_returncode()
        out = done.stdout
    except FileNotFoundError as exc:
        raise MysqlError(f"{binary} is not installed or not on PATH",
                         hint="install mariadb-client (mysql-client for a MySQL server)") from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise MysqlError(f"{binary} --version failed: {exc}", hint="check the client's installation") from exc
    return parse_version(out)


def check_compatible(binary: str, client: Version, server: Version, where_: str) -> None:
    """Refuse before dumping when the client is of the other family or older than the server.

    mysqldump 8 fails against MariaDB (column statistics, GTID syntax), mariadb-dump misreads MySQL 8's data
    dictionary, and an older client does not know what a newer server has (MariaDB 10.10's UUID and INET4
    types, MySQL 8's roles): each would fail mid-dump or, worse, dump less."""
    if client.mariadb != server.mariadb:
        want = "mariadb-dump (package mariadb-client)" if server.mariadb else "mysqldump from MySQL (mysql-client)"
        raise MysqlError(f"{where_}: server is {server.short()} but {binary} is {client.short()}, the other family, "
                         "which does not dump it faithfully", hint=f"use {want} of version "
                         f"{server.number[0]}.{server.number[1]} or newer")
    if client.number[:2] < server.number[:2]:
        raise MysqlError(f"{where_}: server is {server.short()} but {binary} is {client.short()}, older than the "
                         "server, which may dump less than the server holds",
                         hint=f"use an image whose {client.family} client is {server.number[0]}.{server.number[1]} "
                              "or newer")


def server_version(conn: pymysql.Connection) -> Version:
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION(), @@version_comment")
        version, comment = cur.fetchone()
    return parse_version(f"{version} {comment}")


# --- databases, identity ------------------------------------------------------------------------------------


def list_databases(db: DatabaseSettings) -> list[str]:
    """Every database but the server's own schemas, for MYSQL_DATABASE=*."""
    with connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME")
        return [str(r[0]) for r in cur.fetchall() if str(r[0]) not in SYSTEM_SCHEMAS]


def identity(conn: pymysql.Connection, db: DatabaseSettings) -> dict[str, Any]:
    """The manifest's source fields: MySQL's ``server_uuid`` where the server has one (MariaDB has none, so
    its backups are told apart by ``host:port``, the documented fallback), and the server's address."""
    fields: dict[str, Any] = {"system_identifier": None, "database_oid": None, "source": f"{db.host}:{db.port}"}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@server_uuid")
            row = cur.fetchone()
        fields["system_identifier"] = str(row[0]) if row and row[0] else None
    except pymysql.err.MySQLError:
        pass  # MariaDB: Unknown system variable 'server_uuid'
    return fields


def server_identity(db: DatabaseSettings) -> dict[str, Any]:
    with connect(db) as conn:
        return identity(conn, db)


# --- what the dump records about the source ----------------------------------------------------------------


def _objects(cur: pymysql.cursors.Cursor, dbname: str) -> dict[str, int]:
    """Object counts of one database from information_schema (compared by drills after a restore)."""
    queries = {
        "tables": "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_TYPE='BASE TABLE'",
        "views": "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_TYPE='VIEW'",
        "sequences": "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s AND TABLE_TYPE='SEQUENCE'",
        "triggers": "SELECT count(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA=%s",
        "procedures": "SELECT count(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA=%s "
                      "AND ROUTINE_TYPE='PROCEDURE'",
        "functions": "SELECT count(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA=%s "
                     "AND ROUTINE_TYPE='FUNCTION'",
        "events": "SELECT count(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA=%s",
    }
    out = {}
    for kind, query in queries.items():
        cur.execute(query, (dbname,))
        out[kind] = int(cur.fetchone()[0])
    return out


def _non_transactional(cur: pymysql.cursors.Cursor, dbname: str) -> list[str]:
    """Base tables --single-transaction cannot dump consistently (MyISAM, MEMORY, non-transactional Aria, ...)."""
    cur.execute("SELECT TABLE_NAME, ENGINE, CREATE_OPTIONS FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA=%s AND TABLE_TYPE='BASE TABLE' ORDER BY TABLE_NAME", (dbname,))
    out = []
    for name, engine, options in cur.fetchall():
        engine = str(engine or "")
        if engine == "InnoDB" or (engine == "Aria" and "transactional=1" in str(options or "").lower()):
            continue
        out.append(f"{name} ({engine or 'unknown engine'})")
    return out


def properties(cur: pymysql.cursors.Cursor, dbname: str) -> dict[str, Any] | None:
    cur.execute("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                "WHERE SCHEMA_NAME=%s", (dbname,))
    row = cur.fetchone()
    if not row:
        return None
    return {"encoding": str(row[0]), "collate": str(row[1])}


def _log_bin(cur: pymysql.cursors.Cursor) -> bool:
    cur.execute("SELECT @@log_bin")
    row = cur.fetchone()
    return bool(row and int(row[0]))


# --- the dump ----------------------------------------------------------------------------------------------


def dump_artifact(settings: Settings, dbname: str, cancel: CancelToken) -> Artifact:
    """mariadb-dump of one database as plain SQL, restorable with ``zstd -dc FILE | mariadb DB``.

    No ``--databases``: the script carries no CREATE DATABASE or USE, so it goes into whatever database the
    restore names. The database's character set and collation go into the manifest instead."""
    check_name(dbname, settings)
    db = settings.db
    binary = dump_binary()
    consistency = ["--lock-all-tables"] if db.lock_all_tables else ["--single-transaction"]
    argv = [*consistency, "--routines", "--triggers", "--events", "--hex-blob", "--quick", "--no-tablespaces",
            "--default-character-set=utf8mb4", "--max-allowed-packet=1G"]
    warnings: list[str] = []
    contents: dict[str, Any] = {"rows": {}, "rows_exact": True, "objects": {}}
    position: dict[str, Any] = {}
    scanner = DumpScanner(contents["rows"], position)

    def preflight() -> dict[str, Any]:
        with connect(db, dbname) as conn:
            server = server_version(conn)
            version = client_version(binary)
            check_compatible(binary, version, server, where(db, dbname))
            with conn.cursor() as cur:
                contents["objects"] = _objects(cur, dbname)
                props = properties(cur, dbname)
                loose = _non_transactional(cur, dbname)
                if _log_bin(cur):
                    argv.append("--master-data=2")
                    if version.mariadb:
                        argv.append("--gtid")
        if loose and not db.lock_all_tables:
            warnings.append(f"{len(loose)} table(s) of a non-transactional engine are not in the consistent "
                            f"snapshot and may be dumped mid-change: {', '.join(loose[:10])} (hint: convert them "
                            "to InnoDB, or set MYSQLDUMP_LOCK_ALL_TABLES=true: --lock-all-tables holds a global "
                            "read lock for the whole dump, so writers wait)")
        return {"engine": "mariadb", "client_version": version.text, "server_version": server.text,
                "contents": contents, "position": position, "database_properties": props}

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        child = client(db, binary, [*argv, "--", dbname], timeout_s=settings.dump.timeout_s, cancel=cancel)
        with child_source(child, warnings) as (chunks, finish):
            yield scanner.scan(chunks), finish

    return Artifact(dbname, "database", "plain", open_source, preflight)


def globals_artifact(settings: Settings, cancel: CancelToken) -> Artifact:
    """Users, roles and grants (``mariadb-dump --system=users``) as ``_globals``, written as
    ``CREATE USER IF NOT EXISTS`` so they apply to a server that already has some (its root).

    Password hashes only with BACKUP_GLOBALS_PASSWORDS; without, each user that had one is created locked
    (``ACCOUNT LOCK``), never passwordless: a MariaDB user without a password accepts an empty one."""
    db = settings.db
    binary = dump_binary()
    warnings: list[str] = []

    def preflight() -> dict[str, Any]:
        with connect(db) as conn:
            server = server_version(conn)
        version = client_version(binary)
        check_compatible(binary, version, server, where(db))
        if not version.mariadb:
            raise MysqlError(f"{where(db)}: users and grants of a MySQL server are not backed up",
                             hint="set BACKUP_GLOBALS=false (mysqldump has no --system=users)")
        return {"engine": "mariadb", "client_version": version.text, "server_version": server.text}

    @contextmanager
    def open_source() -> Iterator[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        child = client(db, binary, ["--system=users", "--insert-ignore", "--default-character-set=utf8mb4"],
                       timeout_s=settings.dump.timeout_s, cancel=cancel)
        with child_source(child, warnings) as (chunks, finish):
            yield (chunks if settings.dump.globals_passwords else without_passwords(chunks)), finish

    return Artifact(GLOBALS_NAME, "globals", "plain", open_source, preflight)


# --- the claim: GET_LOCK on a session of its own ------------------------------------------------------------


class LockLease(MonitoredLease):
    """A named lock (``GET_LOCK``) held by a connection of its own; the server frees it when the session ends,
    however the sidecar ended. Probed like the PostgreSQL advisory lock (app/leases.py)."""

    def __init__(self, conn: pymysql.Connection, name: str, what: str) -> None:
        super().__init__(what, "the database lock claiming this slot")
        self.conn, self.name = conn, name

    def held(self) -> str | None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self.name,))
                row = cur.fetchone()
        except pymysql.err.MySQLError as exc:
            return str(exc.args[-1]) if exc.args else exc.__class__.__name__
        return None if row and row[0] == 1 else "the server no longer holds the lock for this session"

    def close(self) -> None:
        try:
            self.conn.close()
        except pymysql.err.MySQLError:
            pass


def lock_name(artifact: str) -> str:
    """GET_LOCK names are at most 64 characters and server-wide: hash long artifact names."""
    import hashlib

    name = f"backup-sidecar:{artifact}"
    return name if len(name) <= 64 else "backup-sidecar:" + hashlib.sha256(artifact.encode()).hexdigest()[:40]


def claim_lease(db: DatabaseSettings, artifact: str, app_name: str) -> tuple[LockLease | None, dict[str, Any], str]:
    """Try the artifact's named lock: (lease or None when taken, the source's identity, who holds it).

    Raises MysqlError when the server cannot be reached (the caller then runs without a claim, and the dump
    fails the same way, visibly)."""
    conn = connect(db)
    try:
        ident = identity(conn, db)
        with conn.cursor() as cur:
            cur.execute("SET SESSION wait_timeout = 31536000")  # the claim session idles for the whole dump
            _keepalive(conn)
            name = lock_name(artifact)
            cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            got = cur.fetchone()
            if got and got[0] == 1:
                lease = LockLease(conn, name, artifact)
                lease.start()
                return lease, ident, ""
            cur.execute("SELECT p.HOST, p.TIME, p.INFO FROM information_schema.PROCESSLIST p "
                        "WHERE p.ID = IS_USED_LOCK(%s)", (name,))
            row = cur.fetchone()
    except BaseException:
        conn.close()
        raise
    conn.close()
    holder = f"{row[0]} for {row[1]}s" if row else "another host"
    return None, ident, holder


def _keepalive(conn: pymysql.Connection) -> None:
    sock = getattr(conn, "_sock", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


# --- helpers for restores and drills --------------------------------------------------------------------------


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def database_exists(db: DatabaseSettings, dbname: str) -> bool:
    with connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME=%s", (dbname,))
        return cur.fetchone() is not None


def databases_like(db: DatabaseSettings, prefix: str) -> list[str]:
    with connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
                    (prefix.replace("_", "\\_") + "%",))
        return [str(r[0]) for r in cur.fetchall()]


def create_database(db: DatabaseSettings, dbname: str, props: dict[str, Any] | None) -> None:
    charset = f" CHARACTER SET {props['encoding']} COLLATE {props['collate']}" if props else ""
    run(db, f"CREATE DATABASE {quote(dbname)}{charset}")


def drop_database(db: DatabaseSettings, dbname: str) -> None:
    run(db, f"DROP DATABASE IF EXISTS {quote(dbname)}")


def run(db: DatabaseSettings, sql: str, args: Sequence[Any] = (), dbname: str | None = None) -> None:
    """One statement; MysqlError (with the server's words) when it fails."""
    with connect(db, dbname) as conn, conn.cursor() as cur:
        try:
            cur.execute(sql, args or None)
        except pymysql.err.MySQLError as exc:
            raise MysqlError(explain(str(exc.args[-1]) if exc.args else str(exc), db, dbname)) from exc


def recorded_contents(db: DatabaseSettings, dbname: str) -> dict[str, Any]:
    """What a restored database holds, in the shape of the manifest's ``contents`` (exact row counts)."""
    with connect(db, dbname) as conn, conn.cursor() as cur:
        objects = _objects(cur, dbname)
        cur.execute("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s "
                    "AND TABLE_TYPE='BASE TABLE' ORDER BY TABLE_NAME", (dbname,))
        rows = {}
        for (name,) in cur.fetchall():
            cur.execute(f"SELECT count(*) FROM {quote(str(name))}")  # noqa: S608 - a quoted identifier
            rows[str(name)] = int(cur.fetchone()[0])
    return {"rows": rows, "rows_exact": True, "objects": objects}
