"""The storage interface every target implements: begin/commit uploads, open, stat, list, delete.

Small on purpose (restic's backends, offen's ``Backend``): one contract test runs against every target.
Each target publishes its own copy on its own: one target failing never takes another's copy with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from app.errors import SidecarError


class TargetError(SidecarError):
    """A storage failure, with a one-line message that already carries a hint."""


class ObjectLocked(TargetError):
    """A delete the store refused because the object is retained (S3 Object Lock) or under a legal hold: not a
    failure of the target; prune keeps the object, counts it, and deletes it on a run after the lock ends."""

    def __init__(self, key: str, until: datetime | None, held: bool) -> None:
        why = "under a legal hold" if held else f"retained until {until:%Y-%m-%d %H:%M} UTC" if until else "locked"
        super().__init__(f"{key} is {why}")
        self.key, self.until, self.held = key, until, held


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime
    #: what a stat sees of the stored bytes, recorded at commit: ``sha256:<hex>`` (NAS extended attribute) or
    #: ``etag:<etag>`` (S3); None where the target keeps none. Compared with the copy's manifest by the catalog.
    checksum: str | None = None


class Upload(ABC):
    """An object being written. Nothing is visible at its key until ``commit``; ``abort`` leaves no trace.

    The split lets one dump feed several targets, and each target publish its copy when that copy is
    complete, while a copy that failed leaves nothing at the final name.
    """

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self, sha256: str | None = None) -> str | None:
        """Publish at the final key; ``sha256`` (of all bytes written) is recorded where a stat sees it.
        Returns the stored fingerprint (``ObjectInfo.checksum`` of the published object)."""

    @abstractmethod
    def abort(self) -> None: ...


class Target(ABC):
    name: str  # "nas" | "s3"

    @abstractmethod
    def describe(self) -> str:
        """Where it stores, for logs and tables: ``/backups`` or ``s3://bucket/prefix``."""

    @abstractmethod
    def check(self) -> None:
        """Raise TargetError (with a hint) when the target cannot take a backup right now."""

    @abstractmethod
    def begin(self, key: str, size_hint: int | None = None) -> Upload:
        """Start an upload; ``size_hint`` (bytes, an estimate) lets a target plan its parts up front and
        refuse at once an object it could not store."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming reader; the caller closes it. Raises TargetError when the key is missing."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Finished objects under ``prefix`` (partial uploads are never listed)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        """Remove partial uploads older than ``older_than`` (left by killed runs); return what went."""

    def free_bytes(self) -> int | None:
        """Free space, where the target can know it (a directory); None for object stores."""
        return None

    def put_bytes(self, key: str, data: bytes) -> None:
        upload = self.begin(key, size_hint=len(data))
        try:
            upload.write(data)
            upload.commit()
        except BaseException:
            upload.abort()
            raise

    def replace_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` even if something is there (a failed manifest a catch-up replaces)."""
        self.put_bytes(key, data)

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()
