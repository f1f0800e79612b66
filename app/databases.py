"""Which databases a run backs up: the POSTGRES_DB list, or ``*`` for every connectable one minus excludes."""

from __future__ import annotations

import fnmatch

from app import pg
from app.errors import SidecarError
from app.settings import Settings

#: Databases tried, in order, to read the catalog when POSTGRES_DB=* (any of them lists every database).
_MAINTENANCE_DBS = ("postgres", "template1")


def resolve_databases(settings: Settings, requested: list[str] | None = None) -> list[str]:
    """The names to dump, in order; ``*`` is expanded on the server and POSTGRES_DB_EXCLUDE applied (globs)."""
    names = list(requested or settings.db.databases)
    if "*" in names:
        names = [n for n in names if n != "*"] + [n for n in _list_all(settings) if n not in names]
    excluded = settings.db.exclude
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in excluded)]
    if not names:
        raise SidecarError(
            "no database left to back up after POSTGRES_DB_EXCLUDE "
            f"({', '.join(excluded)}) (hint: check POSTGRES_DB and POSTGRES_DB_EXCLUDE)"
        )
    return list(dict.fromkeys(names))


def _list_all(settings: Settings) -> list[str]:
    last: pg.PgError | None = None
    for dbname in _MAINTENANCE_DBS:
        try:
            with pg.connect(settings.db, dbname) as conn:
                return pg.list_databases(conn)
        except pg.PgError as exc:
            last = exc
    assert last is not None
    raise SidecarError(f"cannot list the databases for POSTGRES_DB=*: {last}")
