"""Roles and tablespaces (``pg_dumpall --globals-only``): what a per-database dump leaves out, and what a
disaster recovery on a new server needs first. Role passwords stay out unless the operator opts in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from app import pg
from app.backup import Artifact, child_source
from app.cancel import CancelToken
from app.pipeline import Child
from app.settings import Settings

GLOBALS_NAME = "_globals"
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
        return {"pg_dump_version": versions.client, "server_version": versions.server}

    def open_source() -> AbstractContextManager[tuple[Iterator[bytes], Callable[[], list[str]]]]:
        argv = ["pg_dumpall", "--no-password", "--globals-only", f"--database={maintenance_db}"]
        if not with_passwords:
            argv.append("--no-role-passwords")
        return child_source(Child(argv, pg.child_env(db), settings.dump.timeout_s, cancel,
                                  explain=lambda line: pg.explain(line, db, maintenance_db)), warnings)

    return Artifact(GLOBALS_NAME, "globals", "plain", open_source, preflight)
