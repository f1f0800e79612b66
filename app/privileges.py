"""What the backup role cannot read, found before a byte is dumped.

``pg_read_all_data`` is not "read everything": PostgreSQL 15 still refuses large objects to it, tables with
row-level security need BYPASSRLS (pg_dump then fails with "query would be affected by row-level security
policy"), and a role that is not a superuser gets no subscriptions and no user-mapping options -- pg_dump
leaves those out *silently*. ``inspect`` finds each case; ``check_backup`` turns them into the backup's
outcome: a failure with the exact SQL that fixes it where data would be missing, a manifest warning where
only metadata is lost. The `check` preflight calls ``inspect`` too, so both say the same thing.

    with pg.connect(db, dbname) as conn:
        for finding in privileges.inspect(conn):
            print(finding.line())
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from app.errors import SidecarError

_USER_NS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
_NOT_EXTENSION = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
                  "AND d.objid = c.oid AND d.deptype = 'e')")


class MissingPrivileges(SidecarError):
    """The backup would silently miss data; the hint holds the SQL that grants what is missing."""


@dataclass(frozen=True)
class Finding:
    """One thing the role cannot read. ``blocking``: data would be missing (the backup must fail)."""

    what: str
    fix: str  # SQL (or the one action) that gives the role what it lacks
    blocking: bool

    def line(self) -> str:
        return f"{self.what} (hint: {self.fix})"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _examples(names: list[str], total: int) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {total - 3} more" if total > 3 else "")


def inspect(conn: psycopg.Connection) -> list[Finding]:
    """Everything the connected role cannot dump in the connected database; empty for a superuser."""
    row = conn.execute("SELECT rolname, rolsuper, rolbypassrls, current_database() FROM pg_roles "
                       "WHERE rolname = current_user").fetchone()
    if row is None:
        return []
    role, superuser, bypassrls, dbname = (_text(v) if isinstance(v, bytes) else v for v in row)
    if superuser:
        return []
    findings: list[Finding] = []
    who = _ident(str(role))

    unreadable = _names(conn, f"""
        SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'S') AND {_USER_NS} AND {_NOT_EXTENSION}
          AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
        ORDER BY 1""")
    if unreadable:
        findings.append(Finding(
            f"{len(unreadable)} table(s) or sequence(s) the role {role} cannot read "
            f"({_examples(unreadable, len(unreadable))})",
            f"GRANT pg_read_all_data TO {who};", True))

    if not bypassrls:
        rls = _names(conn, f"""
            SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity AND {_USER_NS}
              AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
            ORDER BY 1""")
        if rls:
            findings.append(Finding(
                f"{len(rls)} table(s) with row-level security ({_examples(rls, len(rls))}): {role} would see only "
                "the rows its policies allow, so pg_dump refuses them",
                f"ALTER ROLE {who} BYPASSRLS;  -- as a superuser", True))

    lo = conn.execute("""
        SELECT count(*) FROM pg_largeobject_metadata m
        WHERE current_setting('lo_compat_privileges')::bool IS NOT TRUE
          AND NOT pg_has_role(m.lomowner, 'USAGE')
          AND NOT EXISTS (SELECT 1 FROM aclexplode(m.lomacl) a WHERE a.privilege_type = 'SELECT'
                          AND (a.grantee = 0 OR pg_has_role(a.grantee, 'USAGE')))""").fetchone()
    if lo and lo[0]:
        grant = ("DO $$DECLARE o oid; BEGIN FOR o IN SELECT oid FROM pg_largeobject_metadata LOOP "
                 f"EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO %I', o, {_literal(str(role))}); END LOOP; END$$;")
        findings.append(Finding(
            f"{lo[0]} large object(s) the role {role} cannot read (pg_read_all_data does not cover large objects)",
            f"in database {dbname}, as a superuser or their owner: {grant}  -- or, server-wide: "
            "ALTER SYSTEM SET lo_compat_privileges = on; SELECT pg_reload_conf();", True))

    subs = conn.execute("SELECT count(oid) FROM pg_subscription WHERE subdbid = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    if subs and subs[0]:
        findings.append(Finding(
            f"{subs[0]} subscription(s) left out of the backup: only a superuser can dump subscriptions",
            "recreate them by hand after a restore, or back up as a superuser", False))

    mappings = conn.execute("""
        SELECT count(*) FROM pg_user_mappings um
        WHERE NOT ((um.umuser <> 0 AND um.usename = current_user AND has_server_privilege(um.srvid, 'USAGE'))
                   OR (um.umuser = 0 AND has_server_privilege(um.srvid, 'USAGE')))""").fetchone()
    if mappings and mappings[0]:
        findings.append(Finding(
            f"{mappings[0]} user mapping(s) whose options (remote user, password) are left out: only a superuser "
            "or the mapped user sees them",
            "set the options again after a restore (ALTER USER MAPPING ... OPTIONS), or back up as a superuser",
            False))
    return findings


def check_backup(conn: psycopg.Connection, dbname: str) -> list[str]:
    """Raise MissingPrivileges (with the SQL) when data would be missing; return the metadata warnings."""
    findings = inspect(conn)
    blocking = [f for f in findings if f.blocking]
    if blocking:
        raise MissingPrivileges(f"{dbname}: the backup would be incomplete: " + "; ".join(f.what for f in blocking),
                                hint=" ".join(f.fix for f in blocking))
    return [f"{dbname}: {f.line()}" for f in findings]


def _names(conn: psycopg.Connection, query: str) -> list[str]:
    return [_text(r[0]) for r in conn.execute(query).fetchall()]


def _text(value: object) -> str:
    """psycopg returns bytes for text on SQL_ASCII databases."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
