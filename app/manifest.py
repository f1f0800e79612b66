"""The manifest: the completion marker written after the artifact, on success and on failure.

Only a manifest whose status is ok, and whose artifact has its size (and, when read, its SHA-256), makes a
backup; everything that lists, prunes, restores or reports health trusts nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

SCHEMA_VERSION = 1


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
    kind: str = "database"  # database | globals | files
    size_bytes: int = 0
    sha256: str | None = None
    pg_dump_version: str | None = None
    server_version: str | None = None
    error: str | None = None
    slot: str | None = None
    warnings: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

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
                schema_version=int(doc.get("schema_version", SCHEMA_VERSION)),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"invalid manifest: {exc.__class__.__name__}: {exc}") from exc
