"""Database administration for restores, drills and disaster recovery: exists, create (with the source's
properties), rename, drop, and reading a database's properties so a backup can record them.

A database's own properties (encoding, locale provider and ICU locale, collation, owner, ACL, comment,
per-database and per-role settings) live outside the database, so ``pg_restore`` without ``--create`` never
brings them back; ``pg_restore --create`` would, but only under the original name. The sidecar records
them in the manifest at backup time (`properties`) and recreates them under any name (`create_database`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from app import pg
from app.errors import SidecarError
from app.settings import DatabaseSettings

log = logging.getLogger(__name__)

#: User tables that make a database "not empty" (extension-owned tables such as PostGIS's do not count).
_USER_TABLES_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""

#: Settings whose stored value is already a list in SQL syntax (pg_dump's GUC_LIST_QUOTE variables).
_LIST_SETTINGS = frozenset({"search_path", "temp_tablespaces", "session_preload_libraries",
                            "shared_preload_libraries", "local_preload_libraries"})


@dataclass
class DatabaseProperties:
    """What CREATE DATABASE, ALTER DATABASE, COMMENT and GRANT need to make a database like the source's."""

    encoding: str
    collate: str
    ctype: str
    locale_provider: str = "libc"  # libc | icu
    icu_locale: str | None = None
    owner: str | None = None
    connection_limit: int = -1
    comment: str | None = None
    #: None: the default ACL (PUBLIC may connect); else every grant: {"grantee", "privilege", "grantable"}
    acl: list[dict[str, Any]] | None = None
    #: ALTER DATABASE ... SET (role None) and ALTER ROLE ... IN DATABASE ... SET: {"role", "setting"}
    settings: list[dict[str, Any]] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> DatabaseProperties | None:
        if not doc:
            return None
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None


def maintenance_connection(db: DatabaseSettings, avoid: tuple[str, ...] = ()) -> psycopg.Connection:
    """A connection for CREATE/DROP/ALTER DATABASE: to ``postgres``, or ``template1`` where that was dropped
    or is one of the databases in ``avoid`` (a database cannot be renamed from a session inside it)."""
    first, second = ("template1", "postgres") if "postgres" in avoid else ("postgres", "template1")
    try:
        return pg.connect(db, first)
    except pg.PgError as exc:
        if "does not exist" not in str(exc):
            raise
        return pg.connect(db, second)


def database_exists(db: DatabaseSettings, dbname: str) -> bool:
    with maintenance_connection(db) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is not None


def databases_like(db: DatabaseSettings, prefix: str) -> list[str]:
    """Databases whose name starts with ``prefix`` (staging and scratch databases a killed run left)."""
    with maintenance_connection(db) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
                            (prefix,)).fetchall()
    return [str(r[0]) for r in rows]


def user_table_count(db: DatabaseSettings, dbname: str) -> int:
    with pg.connect(db, dbname) as conn:
        row = conn.execute(_USER_TABLES_SQL).fetchone()
        return int(row[0]) if row else 0


def properties(conn: psycopg.Connection, dbname: str) -> DatabaseProperties | None:
    """The properties of ``dbname`` as the server reports them (any database's connection will do)."""
    version = conn.info.server_version
    locale = "d.datlocale" if version >= 170000 else ("d.daticulocale" if version >= 150000 else "NULL")
    provider = "d.datlocprovider::text" if version >= 150000 else "'c'"
    row = conn.execute(
        f"""
        SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, {provider}, {locale}::text,
               pg_get_userbyid(d.datdba), d.datconnlimit, shobj_description(d.oid, 'pg_database'),
               d.datacl IS NULL,
               (SELECT coalesce(json_agg(json_build_object(
                    'grantee', CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                    'privilege', a.privilege_type, 'grantable', a.is_grantable) ORDER BY a.grantee, a.privilege_type),
                    '[]') FROM aclexplode(d.datacl) a),
               (SELECT coalesce(json_agg(json_build_object(
                    'role', CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, 'setting', c)
                    ORDER BY s.setrole, c), '[]')
                FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setdatabase = d.oid)
        FROM pg_database d WHERE d.datname = %s
        """,  # noqa: S608 - only column names vary, chosen above by server version
        (dbname,),
    ).fetchone()
    if row is None:
        return None
    enc, collate, ctype, prov, icu, owner, connlimit, comment, default_acl, acl, settings = row
    return DatabaseProperties(
        encoding=_text(enc), collate=_text(collate), ctype=_text(ctype),
        locale_provider="icu" if _text(prov) == "i" else "libc", icu_locale=_text(icu) if icu else None,
        owner=_text(owner), connection_limit=int(connlimit), comment=_text(comment) if comment else None,
        acl=None if default_acl else list(acl), settings=list(settings),
    )


def _text(value: object) -> str:
    """psycopg returns bytes for text on a SQL_ASCII connection; names here are ASCII in practice."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass
class Applied:
    """What create_database did about the source's properties, for the report (nothing is silently dropped)."""

    dropped: list[str] = field(default_factory=list)


def create_database(db: DatabaseSettings, dbname: str, props: DatabaseProperties | None = None, *,
                    owner: bool = True, acl: bool = True) -> Applied:
    """CREATE DATABASE from template0 (as pg_restore's documentation asks, so template1 additions cannot collide),
    with ``props`` applied: encoding and locale in CREATE, then owner, comment, settings and ACL. ``owner``/``acl``
    False leave those out (``--no-owner``/``--no-acl``), and the returned Applied says what was left out."""
    applied = Applied()
    ident = sql.Identifier(dbname)
    create = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident)
    if props is not None:
        create += sql.SQL(" ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(props.encoding), sql.Literal(props.collate), sql.Literal(props.ctype))
        if props.locale_provider == "icu":
            create += sql.SQL(" LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(props.icu_locale or ""))
        if props.connection_limit != -1:
            create += sql.SQL(" CONNECTION LIMIT {}").format(sql.Literal(props.connection_limit))
    try:
        with maintenance_connection(db) as conn:
            conn.execute(create)
    except psycopg.Error as exc:
        raise SidecarError(f"cannot create database {dbname}: {pg.said(exc)}",
                           hint=pg.hint_with_server(exc, _create_hint(exc, props))) from exc
    if props is None:
        return applied
    steps: list[tuple[str, sql.Composable]] = []
    if props.owner and owner:
        steps.append((f"owner {props.owner}", sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            ident, sql.Identifier(props.owner))))
    elif props.owner:
        applied.dropped.append(f"owner {props.owner} (--no-owner: owned by {db.user})")
    if props.comment:
        steps.append(("comment", sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(props.comment))))
    for item in props.settings:
        name, _, value = str(item["setting"]).partition("=")
        val = sql.SQL(value) if name in _LIST_SETTINGS else sql.Literal(value)
        if item.get("role"):
            if not owner:
                applied.dropped.append(f"setting {name} of role {item['role']} (--no-owner)")
                continue
            stmt = sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
                sql.Identifier(item["role"]), ident, sql.Identifier(name), val)
        else:
            stmt = sql.SQL("ALTER DATABASE {} SET {} = {}").format(ident, sql.Identifier(name), val)
        steps.append((f"setting {name}", stmt))
    if props.acl is not None and acl:
        steps.append(("ACL", sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident)))
        if props.owner and owner:
            steps.append(("ACL", sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                ident, sql.Identifier(props.owner))))
        for grant in props.acl:
            grantee = str(grant["grantee"])
            if not owner and grantee == props.owner:
                grantee = db.user
            who = sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee)
            stmt = sql.SQL("GRANT {} ON DATABASE {} TO {}").format(sql.SQL(str(grant["privilege"])), ident, who)
            if grant.get("grantable"):
                stmt += sql.SQL(" WITH GRANT OPTION")
            steps.append(("ACL", stmt))
    elif props.acl is not None:
        applied.dropped.append("database ACL (--no-acl: default privileges, PUBLIC may connect)")
    try:
        with maintenance_connection(db) as conn, conn.transaction():
            for what, stmt in steps:
                try:
                    conn.execute(stmt)
                except psycopg.Error as exc:
                    raise SidecarError(
                        f"cannot give database {dbname} its {what}: {pg.said(exc)}",
                        hint=pg.hint_with_server(exc, "the restoring role must be a superuser or a member of the "
                                                 "owner and grantee roles (restore the globals first), or pass "
                                                 "--no-owner/--no-acl to leave them out")) from exc
    except BaseException:
        drop_database(db, dbname)
        raise
    return applied


def _create_hint(exc: psycopg.Error, props: DatabaseProperties | None) -> str:
    text = str(exc).lower()
    if "permission denied" in text:
        return "the restoring role needs CREATEDB (ALTER ROLE name CREATEDB)"
    if props is not None and ("locale" in text or "collation" in text or "encoding" in text):
        return (f"this server lacks the source's locale (encoding {props.encoding}, collate {props.collate}, "
                f"provider {props.locale_provider} {props.icu_locale or ''}); install it, or restore into an "
                "existing database without --create")
    return "see PostgreSQL's reason above"


def drop_database(db: DatabaseSettings, dbname: str) -> None:
    """Drop ``dbname``, ending the sessions on it.

    WITH (FORCE) refuses to end a session of a role this one is not a member of, and on PostgreSQL 15 an
    autovacuum worker (which a freshly restored scratch database attracts) counts as one for a role without
    superuser or pg_signal_backend. A plain DROP DATABASE ends autovacuum workers by itself and waits up to 5 s
    for other sessions to leave, so it is the fallback; a session that stays makes it fail with the reason."""
    force = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    plain = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname))
    try:
        with maintenance_connection(db) as conn:
            try:
                conn.execute(force)
            except psycopg.errors.InsufficientPrivilege:
                conn.execute(plain)
    except psycopg.Error as exc:
        raise SidecarError(f"cannot drop database {dbname}: {pg.said(exc)}",
                           hint=pg.hint_with_server(exc, "drop it by hand")) from exc


def swap_databases(db: DatabaseSettings, live: str, staged: str, retired: str) -> None:
    """Put ``staged`` in place of ``live`` in one transaction: ``live`` becomes ``retired``, ``staged`` becomes
    ``live``. Either both renames happen or neither does; sessions on ``live`` are ended first (a rename needs
    the database idle)."""
    try:
        with maintenance_connection(db, avoid=(live, staged)) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", ([live, staged],))
            with conn.transaction():
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(live), sql.Identifier(retired)))
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(staged), sql.Identifier(live)))
    except psycopg.Error as exc:
        raise SidecarError(f"cannot swap {staged} in for {live}: {pg.said(exc)}",
                           hint=pg.hint_with_server(exc, "renaming a database needs its owner (or a superuser) "
                                                    f"with CREATEDB; {live} is unchanged")) from exc


def rename_database(db: DatabaseSettings, old: str, new: str) -> None:
    try:
        with maintenance_connection(db, avoid=(old, new)) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
    except psycopg.Error as exc:
        raise SidecarError(f"cannot rename {old} to {new}: {pg.said(exc)}",
                           hint=pg.hint_with_server(exc, "renaming needs the database's owner or a superuser, "
                                                    "with CREATEDB")) from exc


def lock_capacity(db: DatabaseSettings) -> int:
    """How many locks one transaction can take at most: the shared lock table's size."""
    with maintenance_connection(db) as conn:
        row = conn.execute("SELECT current_setting('max_locks_per_transaction')::int * "
                           "(current_setting('max_connections')::int "
                           "+ current_setting('max_prepared_transactions')::int)").fetchone()
    return int(row[0]) if row else 0
