"""Which artifacts the job should produce: the one answer that backups, /health, /metrics, retention and the
weekly report all use.

A job's units are each database (POSTGRES_DB, with ``*`` resolved on the server, minus POSTGRES_DB_EXCLUDE),
``_globals`` with BACKUP_GLOBALS, and the files archive with FILES_PATHS. Anything the targets hold that is
not a unit any more (a dropped database, a name taken out of POSTGRES_DB) is *retired*: its backups stay
under retention and are reported as information, never as a missing backup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.databases import resolve_databases, sqlite_names
from app.errors import SidecarError
from app.settings import Settings

GLOBALS = "_globals"


@dataclass(frozen=True)
class Unit:
    """One expected artifact: its name in the layout, its kind, the database whose advisory lock claims it
    (PostgreSQL), and the engine that makes it (a SQLite file's unit is ``sqlite``; the others follow the
    server's: postgresql | mariadb | none)."""

    name: str
    kind: str  # database | globals | files
    lock_db: str
    engine: str = "postgresql"


def expected_units(settings: Settings, databases: Sequence[str] | None = None) -> list[Unit]:
    """The job's units; resolves ``*`` on the server (raises SidecarError when it cannot be listed).

    ``databases`` (``backup --db``) narrows the job to those databases, without the extras.
    """
    files = sqlite_names(settings)
    server = [n for n in databases if n not in files] if databases else None
    names = [] if server == [] else resolve_databases(settings, server)
    engine = settings.db.engine
    clash = [n for n in names if n in files]
    if clash:  # POSTGRES_DB=* / MYSQL_DATABASE=* found a database named like a SQLite file
        raise SidecarError(f"the server has a database named {clash[0]!r}, like a file of SQLITE_PATHS (hint: give "
                           f"the file a name of its own: SQLITE_PATHS=NAME=/path/to/{clash[0]}.sqlite)")
    units = [Unit(n, "database", n, engine) for n in names]
    units += [Unit(n, "database", n, "sqlite") for n in files if not databases or n in databases]
    if databases:
        return units
    return units + _extras(settings, names)


def static_units(settings: Settings) -> list[Unit]:
    """The units known without asking the server: named databases (not ``*``), SQLite files and the extras."""
    names = [n for n in settings.db.databases if n != "*"]
    return ([Unit(n, "database", n, settings.db.engine) for n in names]
            + [Unit(n, "database", n, "sqlite") for n in sqlite_names(settings)] + _extras(settings, names))


def is_dynamic(settings: Settings) -> bool:
    """True when the set of databases comes from the server (POSTGRES_DB=*)."""
    return "*" in settings.db.databases


def _extras(settings: Settings, names: Sequence[str]) -> list[Unit]:
    home = names[0] if names else "postgres"
    engine = settings.db.engine
    out: list[Unit] = []
    if settings.dump.globals and engine != "none":
        out.append(Unit(GLOBALS, "globals", home, engine))
    if settings.files is not None:
        if settings.files.name in names:  # POSTGRES_DB=* found a database of that name: settings could not know
            raise SidecarError(f"FILES_NAME={settings.files.name!r} is also the name of a database on the server "
                               "(hint: give the files archive a name of its own, e.g. FILES_NAME=app_files)")
        out.append(Unit(settings.files.name, "files", home, engine))
    return out
