"""Which databases a run backs up: the POSTGRES_DB list, or ``*`` for every connectable one minus excludes,
and the one rule that decides which names can be backed up at all (``name_problem``).

The rule is the same for names given in POSTGRES_DB (refused at configuration time) and names ``*`` finds
on the server (each one failing loudly as its own unit, never "ok but invisible"): a name must be usable
as the first part of every key (no '/', no leading '.', no NUL) and must not be one of the sidecar's own
artifacts (``_globals``, the files archive's FILES_NAME), or list, restore and prune would mix them up.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from app.errors import SidecarError

if TYPE_CHECKING:
    from app.settings import Settings

GLOBALS_NAME = "_globals"


def name_problem(name: str, files_name: str | None = None) -> str | None:
    """Why ``name`` cannot be backed up under its own name (None: it can), with a hint."""
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        return (f"database name {name!r} cannot be used in a backup path "
                "(hint: names with '/' or a leading '.' are not supported; rename the database or exclude it "
                "with POSTGRES_DB_EXCLUDE)")
    if name == GLOBALS_NAME:
        return (f"a database named {name!r} would share its backups with the cluster's globals artifact "
                "(hint: rename the database, or exclude it with POSTGRES_DB_EXCLUDE)")
    if files_name is not None and name == files_name:
        return (f"a database named {name!r} would share its backups with the files archive FILES_NAME={name} "
                "(hint: give the files archive a name of its own, e.g. FILES_NAME=app_files)")
    return None


def check_name(name: str, settings: Settings) -> None:
    """Raise SidecarError when ``name`` breaks the rule (called before anything is written for it)."""
    problem = name_problem(name, settings.files.name if settings.files else None)
    if problem:
        what, _, hint = problem.partition(" (hint: ")
        raise SidecarError(what, hint=hint.removesuffix(")") or None)

#: Databases tried, in order, to read the catalog when POSTGRES_DB=* (any of them lists every database).
_MAINTENANCE_DBS = ("postgres", "template1")


def resolve_databases(settings: Settings, requested: list[str] | None = None) -> list[str]:
    """The names to dump, in order; ``*`` is expanded on the server and POSTGRES_DB_EXCLUDE applied (globs)."""
    names = list(requested or settings.db.databases)
    if settings.db.engine == "none":  # SQLITE_PATHS only: no server, so no server database
        return []
    if "*" in names:
        from app.engines import list_databases

        names = [n for n in names if n != "*"] + [n for n in list_databases(settings) if n not in names]
    excluded = settings.db.exclude
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in excluded)]
    if not names:
        raise SidecarError(
            "no database left to back up after POSTGRES_DB_EXCLUDE "
            f"({', '.join(excluded)}) (hint: check POSTGRES_DB and POSTGRES_DB_EXCLUDE)"
        )
    return list(dict.fromkeys(names))


def list_postgres_databases(settings: Settings) -> list[str]:
    from app import pg

    last: Exception | None = None
    for dbname in _MAINTENANCE_DBS:
        try:
            with pg.connect(settings.db, dbname) as conn:
                return pg.list_databases(conn)
        except pg.PgError as exc:
            last = exc
    assert last is not None
    raise SidecarError(f"cannot list the databases for POSTGRES_DB=*: {last}")


def sqlite_names(settings: Settings) -> list[str]:
    """The SQLite files' unit names (SQLITE_PATHS), in order."""
    return [name for name, _ in settings.sqlite.files] if settings.sqlite else []
