"""The engines the sidecar backs up, chosen by a plain factory over the settings (no plugin registry).

One server per sidecar, ``settings.db.engine``: PostgreSQL (app/pgdump.py, app/pg.py, app/globals_dump.py)
or MariaDB/MySQL (app/engines/mysql.py); or none, when only SQLite files are configured. SQLite files
(SQLITE_PATHS, app/engines/sqlite.py) are files on a volume, not a server, so they may sit beside either.
Every engine produces the same Artifact (app/backup.py), so schedule, locks, streaming, targets, manifests,
retention, /health, /metrics and notifications are shared; a manifest's ``engine`` says which way it goes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.backup import Artifact
    from app.cancel import CancelToken
    from app.settings import Settings
    from app.units import Unit

POSTGRESQL, MARIADB, SQLITE, NONE = "postgresql", "mariadb", "sqlite", "none"


def database_artifact(settings: Settings, unit: Unit, cancel: CancelToken) -> Artifact:
    """The dump of one database unit, by the unit's engine."""
    if unit.engine == SQLITE:
        from app.engines.sqlite import sqlite_artifact

        assert settings.sqlite is not None
        path = settings.sqlite.path_of(unit.name)
        assert path is not None
        return sqlite_artifact(unit.name, path, cancel)
    if unit.engine == MARIADB:
        from app.engines import mysql

        return mysql.dump_artifact(settings, unit.name, cancel)
    from app.pgdump import dump_artifact

    return dump_artifact(settings, unit.name, cancel)


def globals_artifact(settings: Settings, cancel: CancelToken) -> Artifact:
    """Roles/users and grants of the server: pg_dumpall --globals-only, or mariadb-dump --system=users."""
    if settings.db.engine == MARIADB:
        from app.engines import mysql

        return mysql.globals_artifact(settings, cancel)
    from app.globals_dump import globals_artifact as pg_globals

    return pg_globals(settings, cancel)


def list_databases(settings: Settings) -> list[str]:
    """Every database of the server, for ``*`` (PostgreSQL: connectable non-templates; MariaDB: all but its own
    schemas); raises SidecarError when the server cannot be asked."""
    if settings.db.engine == MARIADB:
        from app.engines import mysql

        return mysql.list_databases(settings.db)
    from app.databases import list_postgres_databases

    return list_postgres_databases(settings)


def server_identity_fields(settings: Settings) -> dict[str, Any]:
    """The server's identity as manifest fields (system_identifier, source); empty without a server."""
    if settings.db.engine == NONE:
        return {}
    if settings.db.engine == MARIADB:
        from app.engines import mysql

        return mysql.server_identity(settings.db)
    raise AssertionError("PostgreSQL identities are read by app.identity")
