"""What a database holds, recorded in the manifest at backup time (``contents``) and compared by drills.

    "contents": {"rows": {"public.orders": 1200, ...}, "rows_exact": true,
                 "objects": {"schemas": 2, "tables": 7, "indexes": 9, ..., "large_objects": 3}}

Row counts are exact (``count(*)``, in the snapshot pg_dump then dumps, so they match the archive) while the
tables are small enough to count cheaply (``EXACT_MAX_PAGES`` in all), else the planner's estimates
(``reltuples``; ``null`` for a table never analysed) with ``rows_exact`` false. Object counts are always
exact. Everything runs server-side in a few queries: nothing depends on the client encoding (SQL_ASCII
databases hand psycopg bytes).
"""

from __future__ import annotations

from typing import Any

import psycopg

#: About 1 GiB of heap: beyond this, counting would add noticeably to the backup, so estimates are recorded.
EXACT_MAX_PAGES = 131072

_USER_NS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"


def _not_member(catalog: str, alias: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
            f"AND d.objid = {alias}.oid AND d.deptype = 'e')")


_TABLES = f"""
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND {_USER_NS} AND {_not_member('pg_class', 'c')}"""

_OBJECTS_SQL = f"""
SELECT
  (SELECT count(*) FROM pg_namespace n WHERE {_USER_NS} AND {_not_member('pg_namespace', 'n')}),
  count(*) FILTER (WHERE c.relkind = 'r'), count(*) FILTER (WHERE c.relkind = 'p'),
  count(*) FILTER (WHERE c.relkind = 'v'), count(*) FILTER (WHERE c.relkind = 'm'),
  count(*) FILTER (WHERE c.relkind = 'S'), count(*) FILTER (WHERE c.relkind IN ('i', 'I')),
  count(*) FILTER (WHERE c.relkind = 'f'),
  (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE {_USER_NS} AND {_not_member('pg_proc', 'p')}),
  (SELECT count(*) FROM pg_trigger t WHERE NOT t.tgisinternal),
  (SELECT count(*) FROM pg_policy),
  (SELECT count(*) FROM pg_extension),
  (SELECT count(*) FROM pg_largeobject_metadata)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {_USER_NS} AND {_not_member('pg_class', 'c')}"""

OBJECT_KINDS = ("schemas", "tables", "partitioned_tables", "views", "materialized_views", "sequences", "indexes",
                "foreign_tables", "functions", "triggers", "policies", "extensions", "large_objects")


def record(conn: psycopg.Connection, exact: bool | None = None) -> dict[str, Any]:
    """The ``contents`` field for the connected database; ``exact`` None decides by size."""
    row = conn.execute(_OBJECTS_SQL).fetchone()
    objects = dict(zip(OBJECT_KINDS, (int(v) for v in row), strict=True)) if row else {}
    if exact is None:
        pages = conn.execute(f"SELECT coalesce(sum(c.relpages), 0) {_TABLES}").fetchone()
        exact = bool(pages) and int(pages[0]) <= EXACT_MAX_PAGES
    if exact:
        query = f"""SELECT format('%I.%I', n.nspname, c.relname),
                   (xpath('/row/c/text()', query_to_xml(
                        format('SELECT count(*) AS c FROM ONLY %I.%I', n.nspname, c.relname),
                        false, true, '')))[1]::text::bigint
                   {_TABLES} ORDER BY 1"""
    else:
        query = f"""SELECT format('%I.%I', n.nspname, c.relname),
                   CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END {_TABLES} ORDER BY 1"""
    rows = {_text(name): (None if n is None else int(n)) for name, n in conn.execute(query).fetchall()}
    return {"rows": rows, "rows_exact": exact, "objects": objects}


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> tuple[list[str], str]:
    """Differences between what was dumped and what came back, and a one-line summary of what was compared.

    Exact counts must match; estimates only have to be of the same order (within a factor of two, or 1000).
    """
    problems: list[str] = []
    want_objects, got_objects = expected.get("objects") or {}, actual.get("objects") or {}
    for kind in [*OBJECT_KINDS, *sorted(set(want_objects) - set(OBJECT_KINDS))]:  # other engines' kinds too
        if kind in want_objects and want_objects[kind] != got_objects.get(kind):
            problems.append(f"{kind}: {want_objects[kind]} dumped, {got_objects.get(kind)} restored")
    want_rows, got_rows = expected.get("rows") or {}, actual.get("rows") or {}
    missing = sorted(set(want_rows) - set(got_rows))
    extra = sorted(set(got_rows) - set(want_rows))
    if missing:
        problems.append(f"{len(missing)} table(s) missing: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"{len(extra)} unexpected table(s): {', '.join(extra[:5])}")
    exact = bool(expected.get("rows_exact"))
    for table in sorted(set(want_rows) & set(got_rows)):
        want, got = want_rows[table], got_rows[table]
        if want is None or got is None:
            continue
        if exact and want != got:
            problems.append(f"{table}: {want} rows dumped, {got} restored")
        elif not exact and abs(want - got) > 1000 and not (want / 2 <= got <= want * 2):
            problems.append(f"{table}: about {want} rows dumped (estimate), {got} restored")
    total = sum(v for v in got_rows.values() if v)
    summary = (f"{len(got_rows)} tables, {total} rows ({'exact' if exact else 'against estimates'}), "
               f"{sum(got_objects.values())} objects compared")
    return problems, summary


def _text(value: object) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
