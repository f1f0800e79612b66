"""Where a backup lives: ``<name>/<YYYY>/<MM>/<DD>/<name>-<YYYYMMDDTHHMMSSZ>.<ext>``, manifest beside it.

The same relative keys are used under an S3 prefix and under NAS_PATH, so a backup copied between the
two (or restored from either) keeps its ID.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

MANIFEST_SUFFIX = ".manifest.json"
_STAMP = "%Y%m%dT%H%M%SZ"
_ID = re.compile(r"^(?P<name>.+)-(?P<stamp>\d{8}T\d{6}Z)$")

_COMPRESSION_EXT = {"zstd": ".zst", "gzip": ".gz", "none": ""}
_KIND_EXT = {"custom": "dump", "plain": "sql", "tar": "tar", "sqlite": "sqlite"}


#: what an artifact encrypted with age gets after its compression's extension (``dump.zst.age``)
ENCRYPTED_EXT = ".age"


def artifact_ext(fmt: str, compression: str, encrypted: bool = False) -> str:
    """``dump.zst`` for custom+zstd, ``sql.gz`` for plain+gzip (PostgreSQL or MariaDB), ``tar.zst`` for a files
    archive, ``sqlite.zst`` for a SQLite image, ``dump.zst.age`` encrypted, ..."""
    return _KIND_EXT[fmt] + _COMPRESSION_EXT[compression] + (ENCRYPTED_EXT if encrypted else "")


def compression_of(key: str) -> str:
    """The compression an artifact key implies, from its extension."""
    key = key.removesuffix(ENCRYPTED_EXT)
    if key.endswith(".zst"):
        return "zstd"
    if key.endswith(".gz"):
        return "gzip"
    return "none"


def backup_id(name: str, at: datetime) -> str:
    return f"{name}-{at.astimezone(UTC).strftime(_STAMP)}"


def artifact_key(name: str, at: datetime, ext: str) -> str:
    at = at.astimezone(UTC)
    return f"{name}/{at:%Y}/{at:%m}/{at:%d}/{backup_id(name, at)}.{ext}"


def manifest_key(name: str, at: datetime) -> str:
    at = at.astimezone(UTC)
    return f"{name}/{at:%Y}/{at:%m}/{at:%d}/{backup_id(name, at)}{MANIFEST_SUFFIX}"


def manifest_key_for_id(backup_id_: str) -> str:
    """Manifest key of a backup ID; raises ValueError for a string that is not an ID."""
    name, at = parse_id(backup_id_)
    return manifest_key(name, at)


def parse_id(backup_id_: str) -> tuple[str, datetime]:
    m = _ID.match(backup_id_)
    if not m:
        raise ValueError(f"{backup_id_!r} is not a backup ID (hint: IDs look like app-20261122T030000Z; see `list`)")
    return m["name"], datetime.strptime(m["stamp"], _STAMP).replace(tzinfo=UTC)


#: A restore drill's record beside the backup's manifest: ``<ID>.drill-<YYYYMMDDTHHMMSSZ>.json`` (one per drill;
#: targets never overwrite a key, so each drill gets its own).
_DRILL = re.compile(r"^(?P<id>.+-\d{8}T\d{6}Z)\.drill-(?P<at>\d{8}T\d{6}Z)\.json$")


def drill_key(backup_id_: str, at: datetime) -> str:
    """Where the record of a drill of ``backup_id_`` run at ``at`` lives: in the backup's own directory."""
    base = manifest_key_for_id(backup_id_)[: -len(MANIFEST_SUFFIX)]
    return f"{base}.drill-{at.astimezone(UTC).strftime(_STAMP)}.json"


def drill_backup_id(key: str) -> str | None:
    """The backup ID a drill record key belongs to, or None when ``key`` is not a drill record."""
    m = _DRILL.match(key.rsplit("/", 1)[-1])
    return m["id"] if m else None


def is_manifest_key(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX) and _ID.match(key.rsplit("/", 1)[-1][: -len(MANIFEST_SUFFIX)]) is not None


#: Point-in-time recovery: base backups follow the dump layout under this name (``_base/YYYY/MM/DD/_base-<stamp>
#: .tar.zst``); WAL lives apart under ``_wal/<timeline>/<file><ext>`` with ``<file>.manifest.json`` beside it,
#: so no dump listing, stray sweep or dump retention ever sees a WAL object.
BASE_NAME = "_base"
WAL_PREFIX = "_wal/"


def wal_key(name: str, compression: str) -> str:
    """A WAL file's key: a segment, a partial snapshot ``<segment>.partial.<offset>``, or ``<tli>.history``."""
    return f"{WAL_PREFIX}{name[:8]}/{name}{_COMPRESSION_EXT[compression]}"


def wal_manifest_key(name: str) -> str:
    return f"{WAL_PREFIX}{name[:8]}/{name}{MANIFEST_SUFFIX}"


def is_wal_key(key: str) -> bool:
    return key.startswith(WAL_PREFIX)


ARTIFACT_EXTS = tuple(sorted({artifact_ext(f, c, e) for f in _KIND_EXT for c in _COMPRESSION_EXT
                              for e in (False, True)}, key=len, reverse=True))


def artifact_stem(filename: str) -> str | None:
    """The ID in ``<ID>.<one of our artifact extensions>``, or None; database names may contain dots."""
    for ext in ARTIFACT_EXTS:
        if filename.endswith(f".{ext}"):
            stem = filename[: -len(ext) - 1]
            return stem if _ID.match(stem) else None
    return None


def is_own_key(key: str) -> bool:
    """A key of the sidecar's own layout: ``<name>/YYYY/MM/DD/<name>-<stamp>.<ext or manifest>``, with the
    date directories matching the stamp. Whatever else lives under a prefix (other applications' objects and
    uploads) is never ours to delete or abort."""
    parts = key.split("/")
    if len(parts) != 5:
        return False
    filename = parts[-1]
    stem = filename[: -len(MANIFEST_SUFFIX)] if filename.endswith(MANIFEST_SUFFIX) else artifact_stem(filename)
    if not stem or not _ID.match(stem):
        return False
    name, at = parse_id(stem)
    return parts[0] == name and parts[1:4] == [f"{at:%Y}", f"{at:%m}", f"{at:%d}"]
