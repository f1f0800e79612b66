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
_KIND_EXT = {"custom": "dump", "plain": "sql", "tar": "tar"}


def artifact_ext(fmt: str, compression: str) -> str:
    """``dump.zst`` for custom+zstd, ``sql.gz`` for plain+gzip, ``tar.zst`` for a files archive, ..."""
    return _KIND_EXT[fmt] + _COMPRESSION_EXT[compression]


def compression_of(key: str) -> str:
    """The compression an artifact key implies, from its extension."""
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


def is_manifest_key(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX) and _ID.match(key.rsplit("/", 1)[-1][: -len(MANIFEST_SUFFIX)]) is not None


ARTIFACT_EXTS = tuple(sorted({artifact_ext(f, c) for f in _KIND_EXT for c in _COMPRESSION_EXT}, key=len, reverse=True))


def artifact_stem(filename: str) -> str | None:
    """The ID in ``<ID>.<one of our artifact extensions>``, or None; database names may contain dots."""
    for ext in ARTIFACT_EXTS:
        if filename.endswith(f".{ext}"):
            stem = filename[: -len(ext) - 1]
            return stem if _ID.match(stem) else None
    return None
