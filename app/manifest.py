"""The manifest: the completion marker written after the artifact, on success and on failure.

Only a manifest whose status is ok, and whose artifact has its size (and, when read, its SHA-256), makes a
backup; everything that lists, prunes, restores or reports health trusts nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
#: How an output-sanity warning starts in ``warnings`` (a dump far smaller than the previous one, no tables)
SANITY_PREFIX = "output sanity: "


class ManifestError(ValueError):
    """A manifest that cannot be parsed or lacks required fields."""


def utc_iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass
class Manifest:
    id: str
    status: str  # ok | failed
    database: str
    started_at: datetime
    finished_at: datetime | None
    host: str
    format: str  # custom | plain | tar
    compression: str
    artifact: str
    kind: str = "database"  # database | globals | files | base | wal
    size_bytes: int = 0
    sha256: str | None = None
    pg_dump_version: str | None = None
    server_version: str | None = None
    error: str | None = None
    slot: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: what the database held at dump time (app/contents.py): per-table rows, rows_exact, object counts
    contents: dict[str, Any] | None = None
    #: the database's own properties (app/dbadmin.py DatabaseProperties), recreated by restore --create
    database_properties: dict[str, Any] | None = None
    #: which cluster the source was (app/identity.py): pg_control_system()'s identifier, the database's OID,
    #: and host:port as the sidecar reached it (the fallback where the identifier is not readable)
    system_identifier: str | None = None
    database_oid: int | None = None
    source: str | None = None
    #: bytes the producer wrote before compression (sizes of two dumps compare whatever their compression)
    raw_bytes: int | None = None
    #: postgresql | mariadb | sqlite (None in manifests written before other engines existed: postgresql)
    engine: str | None = None
    #: the dump client (mariadb-dump's --version line) or library (SQLite) of engines other than PostgreSQL
    client_version: str | None = None
    #: where the source stood: MariaDB's binlog file/position and GTID; SQLite's journal mode and snapshot time
    position: dict[str, Any] | None = None
    #: base backups and WAL files (kind base | wal): timeline, start_lsn, stop_lsn, wal_segment_size, raw_sha256,
    #: system_identifier, ... (app/basebackup.py, app/walship.py)
    physical: dict[str, Any] | None = None
    #: the target this manifest file describes (each target holds a manifest for its own copy)
    target: str | None = None
    #: what a stat of this target's artifact must show (ObjectInfo.checksum): ``sha256:<hex>``, ``etag:<etag>``
    stored_checksum: str | None = None
    #: where a catch-up copied this copy from (``sync``), e.g. ``nas``
    synced_from: str | None = None
    #: client-side encryption of the artifact (app/encryption.py): ``{"scheme": "age", "recipients":
    #: [fingerprints]}``; size and SHA-256 are then of the ciphertext
    encryption: dict[str, Any] | None = None
    #: with encryption: the sensitive fields (table names and row counts of ``contents``, and
    #: ``database_properties``) as an age-armored JSON object, opened with AGE_IDENTITY_FILE (app/encryption.py)
    sealed: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def engine_name(self) -> str:
        return self.engine or "postgresql"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def sanity(self) -> list[str]:
        """The output-sanity warnings (app.sanity) among ``warnings``."""
        return [w[len(SANITY_PREFIX):] for w in self.warnings if w.startswith(SANITY_PREFIX)]

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds(), 3)

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["started_at"] = utc_iso(self.started_at)
        doc["finished_at"] = utc_iso(self.finished_at)
        doc["duration_s"] = self.duration_s
        ordered = {"schema_version": doc.pop("schema_version"), "id": doc.pop("id"), "status": doc.pop("status")}
        ordered.update(doc)
        return (json.dumps(ordered, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ManifestError("manifest is not a JSON object")
            return cls(
                id=str(doc["id"]),
                status=str(doc["status"]),
                database=str(doc["database"]),
                started_at=parse_utc(doc["started_at"]) or datetime.min.replace(tzinfo=UTC),
                finished_at=parse_utc(doc.get("finished_at")),
                host=str(doc.get("host", "")),
                format=str(doc.get("format", "")),
                compression=str(doc.get("compression", "none")),
                artifact=str(doc["artifact"]),
                kind=str(doc.get("kind", "database")),
                size_bytes=int(doc.get("size_bytes") or 0),
                sha256=doc.get("sha256"),
                pg_dump_version=doc.get("pg_dump_version"),
                server_version=doc.get("server_version"),
                error=doc.get("error"),
                slot=doc.get("slot"),
                warnings=list(doc.get("warnings") or []),
                contents=doc.get("contents") if isinstance(doc.get("contents"), dict) else None,
                database_properties=(doc.get("database_properties")
                                     if isinstance(doc.get("database_properties"), dict) else None),
                system_identifier=str(doc["system_identifier"]) if doc.get("system_identifier") else None,
                database_oid=int(doc["database_oid"]) if doc.get("database_oid") is not None else None,
                source=doc.get("source"),
                raw_bytes=int(doc["raw_bytes"]) if doc.get("raw_bytes") is not None else None,
                engine=doc.get("engine"),
                client_version=doc.get("client_version"),
                position=doc.get("position") if isinstance(doc.get("position"), dict) else None,
                physical=doc.get("physical") if isinstance(doc.get("physical"), dict) else None,
                target=doc.get("target"),
                stored_checksum=doc.get("stored_checksum"),
                synced_from=doc.get("synced_from"),
                encryption=doc.get("encryption") if isinstance(doc.get("encryption"), dict) else None,
                sealed=doc.get("sealed") if isinstance(doc.get("sealed"), str) else None,
                schema_version=int(doc.get("schema_version", SCHEMA_VERSION)),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest: {exc.__class__.__name__}: {exc}") from exc
