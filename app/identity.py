"""Which cluster a backup came from: the server's system identifier and the database's OID, recorded in every
manifest, so that two clusters sharing a bucket or NAS never see each other's backups as their own.

``pg_control_system()`` is executable by PUBLIC on PostgreSQL 10 and later (checked on 15 as a role with only
pg_read_all_data and CREATEDB); where a managed service revokes it, the server's ``host:port`` as the sidecar
reaches it stands in. A manifest with neither (written before this existed, or a files archive) matches any
cluster: it is not evidence of a foreign one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from app import pg
from app.errors import SidecarError
from app.manifest import Manifest
from app.settings import DatabaseSettings, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterId:
    """The identity of the server this sidecar backs up (or of the one a manifest came from)."""

    system_identifier: str | None
    source: str | None  # host:port, the fallback

    def describe(self) -> str:
        if self.system_identifier:
            return f"system identifier {self.system_identifier}"
        return f"server {self.source}" if self.source else "an unknown server"

    def matches(self, manifest: Manifest) -> bool:
        """False only when the manifest provably comes from another cluster."""
        if self.system_identifier and manifest.system_identifier:
            return self.system_identifier == manifest.system_identifier
        if self.source and manifest.source and not (self.system_identifier and manifest.system_identifier):
            return self.source == manifest.source
        return True


def of_manifest(m: Manifest) -> ClusterId:
    return ClusterId(m.system_identifier, m.source)


def source_identity(conn: psycopg.Connection, db: DatabaseSettings) -> dict[str, Any]:
    """The manifest fields for the connected database: system identifier, database OID, host:port."""
    fields: dict[str, Any] = {"system_identifier": None, "database_oid": None, "source": f"{db.host}:{db.port}"}
    try:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
        fields["database_oid"] = int(row[0]) if row else None
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        fields["system_identifier"] = str(row[0]) if row and row[0] else None
    except psycopg.Error as exc:  # revoked or an old server: host:port is what is left
        log.info("cannot read the cluster's system identifier (%s); recording %s instead",
                 str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__, fields["source"])
    return fields


def server_identity(settings: Settings) -> ClusterId:
    """This sidecar's cluster, read from the server; raises SidecarError when it cannot be reached.

    MariaDB has no system identifier (MySQL's server_uuid stands in), so its backups are told apart by
    ``host:port``; without a server (SQLITE_PATHS only) every manifest matches."""
    if settings.db.engine != "postgresql":
        from app.engines import server_identity_fields

        fields = server_identity_fields(settings)
        return ClusterId(fields.get("system_identifier"), fields.get("source"))
    candidates = [d for d in settings.db.databases if d != "*"] + ["postgres", "template1"]
    last: SidecarError | None = None
    for dbname in dict.fromkeys(candidates):
        try:
            with pg.connect(settings.db, dbname) as conn:
                fields = source_identity(conn, settings.db)
            return ClusterId(fields["system_identifier"], fields["source"])
        except SidecarError as exc:
            last = exc
            if "does not exist" not in str(exc):  # the server itself is out of reach: one timeout is enough
                break
    assert last is not None
    raise last


def try_server_identity(settings: Settings) -> ClusterId | None:
    """``server_identity`` or None (logged) when the server cannot be reached now."""
    try:
        return server_identity(settings)
    except SidecarError as exc:
        log.warning("cannot read this server's identity, so backups of other clusters are not told apart: %s", exc)
        return None
